"""`maildesk privacy export|erase`, `retention run` and `audit list`, run as processes."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from e2e import COLLEAGUE, CUSTOMER, customer_mail
from support_fixtures import CliResult, Desk, make_pipeline

from maildesk.mail.message import Delivery
from maildesk.store import database, directory

CLAIRE = (b"Claire Dupont", CUSTOMER.encode())


@pytest.fixture
def filed(desk: Desk, tmp_path: Path) -> Iterator[sa.Engine]:
    """The desk with a ticket each from Claire and Marc."""
    engine = database.make_engine(f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}")
    pipeline = make_pipeline(engine, tmp_path)
    pipeline.process(customer_mail().as_bytes(), Delivery(source="smtp"))
    marc = customer_mail(subject="Import", text="Marc Petit ici", sender=COLLEAGUE)
    marc.replace_header("From", f"Marc Petit <{COLLEAGUE}>")
    pipeline.process(marc.as_bytes(), Delivery(source="smtp"))
    yield engine
    engine.dispose()


def run(desk: Desk, *args: str) -> CliResult:
    """The CLI with no terminal on stdin."""
    proc = subprocess.run(
        [sys.executable, "-m", "maildesk", "--config", str(desk.config), *args],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def holding(directory_: Path, needles: tuple[bytes, ...]) -> list[str]:
    """The files under `directory_` that hold any of `needles`."""
    return [str(p) for p in directory_.rglob("*")
            if p.is_file() and any(n in p.read_bytes() for n in needles)]


def test_erase_without_yes_and_without_a_terminal_refuses(desk: Desk, filed: sa.Engine) -> None:
    result = run(desk, "privacy", "erase", CUSTOMER)
    assert result.code == 1 and "--yes" in result.err and "Traceback" not in result.err
    assert holding(desk.directory / "state", CLAIRE)


def test_erase_with_yes_leaves_nothing_of_the_person(desk: Desk, filed: sa.Engine) -> None:
    result = run(desk, "privacy", "erase", CUSTOMER, "--yes")
    assert result.code == 0, result.err
    assert "tickets: 1" in result.out and "person:" in result.out
    assert holding(desk.directory / "state", CLAIRE) == []
    assert holding(desk.directory / "state", (COLLEAGUE.encode(),))
    again = run(desk, "privacy", "erase", CUSTOMER, "--yes")
    assert again.code == 1 and again.err.count("\n") == 1 and "no account" in again.err


def _on_terminal(desk: Desk, typed: bytes, *args: str) -> tuple[int, bytes]:
    """Run the CLI with a terminal on stdin, typing `typed`."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "maildesk", "--config", str(desk.config), *args],
        stdin=follower, stdout=follower, stderr=follower,
    )
    os.close(follower)
    os.write(leader, typed)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # The terminal closes when the process ends.
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    return proc.wait(timeout=60), output


def test_erase_on_a_terminal_asks_for_the_address(desk: Desk, filed: sa.Engine) -> None:
    code, output = _on_terminal(desk, b"someone else\n", "privacy", "erase", CUSTOMER)
    assert code == 1 and b"nothing erased" in output and b"tickets: 1" in output
    assert holding(desk.directory / "state", CLAIRE)
    code, output = _on_terminal(desk, CUSTOMER.upper().encode() + b"\n",
                                "privacy", "erase", CUSTOMER)
    assert code == 0, output
    assert holding(desk.directory / "state", CLAIRE) == []


def test_export_writes_the_zip_and_logs_it(desk: Desk, filed: sa.Engine) -> None:
    target = desk.directory / "claire.zip"
    result = run(desk, "privacy", "export", CUSTOMER, "-o", str(target))
    assert result.code == 0, result.err
    with zipfile.ZipFile(target) as archive:
        data = json.loads(archive.read("data.json"))
        assert data["account"]["email"] == CUSTOMER and len(data["tickets"]) == 1
        assert all(COLLEAGUE.encode() not in archive.read(n) for n in archive.namelist())
    listed = run(desk, "audit", "list", "--action", "privacy", "--json")
    assert [e["action"] for e in json.loads(listed.out)] == ["privacy.export"]
    missing = run(desk, "privacy", "export", "nobody@x.example", "-o", str(target))
    assert missing.code == 1 and "no account" in missing.err


def test_retention_run_dry_then_for_real(desk: Desk, filed: sa.Engine) -> None:
    deactivated = datetime.now(UTC) - timedelta(days=1)
    with database.session_scope(filed) as session:
        directory.deactivate_account(session, email=CUSTOMER, on=deactivated, actor="t")
    before = (deactivated.replace(year=deactivated.year + 5) - timedelta(days=1)).isoformat()
    after = (deactivated.replace(year=deactivated.year + 5) + timedelta(days=1)).isoformat()
    early = run(desk, "retention", "run", "--now", before)
    assert early.code == 0 and "erased 0 accounts" in early.out
    dry = run(desk, "retention", "run", "--dry-run", "--now", after)
    assert dry.code == 0 and "would erase 1 accounts" in dry.out and CUSTOMER in dry.out
    assert holding(desk.directory / "state", CLAIRE)
    done = run(desk, "retention", "run", "--now", after)
    assert done.code == 0 and "erased 1 accounts" in done.out and CUSTOMER not in done.out
    assert holding(desk.directory / "state", CLAIRE) == []
    assert holding(desk.directory / "state", (COLLEAGUE.encode(),))
    bad = run(desk, "retention", "run", "--now", "yesterday")
    assert bad.code == 2 and "ISO 8601" in bad.err


def test_tickets_show_is_in_the_access_log_by_os_user(desk: Desk, filed: sa.Engine) -> None:
    assert run(desk, "tickets", "show", "1").code == 0
    assert run(desk, "accounts", "show", COLLEAGUE).code == 0
    listed = run(desk, "audit", "list", "--action", "access", "--json")
    # The agents' copies of the filed ticket were deliveries of its content: logged too.
    assert {e["action"] for e in json.loads(listed.out)} == {"access.delivery", "access.read"}
    events = json.loads(run(desk, "audit", "list", "--action", "access.read", "--json").out)
    assert [(e["action"], e["ticket"]) for e in events] == [("access.read", 1),
                                                            ("access.read", None)]
    assert all(e["actor"].startswith("cli:") for e in events)
    mine = json.loads(run(desk, "audit", "list", "--account", CUSTOMER, "--json").out)
    assert {"ticket.open", "access.read"} <= {e["action"] for e in mine}
    assert all(e["account"] == mine[0]["account"] for e in mine)
    table = run(desk, "audit", "list", "--ticket", "1", "--since", "2000-01-01")
    assert table.code == 0 and table.out.startswith("AT") and "ticket.open" in table.out
    unknown = run(desk, "audit", "list", "--account", "nobody@x.example")
    assert unknown.code == 1 and "no account" in unknown.err
