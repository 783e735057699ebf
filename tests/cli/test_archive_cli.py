"""`maildesk import mbox|maildir`: past mail filed into tickets, nothing sent, resumable."""

from __future__ import annotations

import mailbox
import signal
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa
from e2e import CUSTOMER, customer_mail, seed
from sqlmodel import Session, func, select
from support_fixtures import Desk, base_config

from maildesk.store import database
from maildesk.store.models import RECEIVED, InboundMail, Outbox, Ticket

MAILS = 1000


def make_desk(tmp_path: Path) -> tuple[Desk, sa.Engine]:
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    desk = Desk(tmp_path, tmp_path / "config.toml")
    desk.write_config(base_config(tmp_path / "state", url))
    engine = database.make_engine(url)
    database.upgrade(engine)
    seed(engine)
    return desk, engine


def counts(engine: sa.Engine) -> tuple[int, int, int, int]:
    with Session(engine) as session:
        inbound = session.exec(select(func.count()).select_from(InboundMail)).one()
        waiting = session.exec(
            select(func.count()).select_from(InboundMail).where(InboundMail.outcome == RECEIVED)
        ).one()
        tickets = session.exec(select(func.count()).select_from(Ticket)).one()
        outbox = session.exec(select(func.count()).select_from(Outbox)).one()
    return inbound, waiting, tickets, outbox


def test_a_1000_mail_mbox_is_filed_sending_nothing_and_resumes_after_a_kill(
    tmp_path: Path,
) -> None:
    desk, engine = make_desk(tmp_path)
    box = mailbox.mbox(tmp_path / "support.mbox")
    for n in range(MAILS):
        box.add(customer_mail(subject=f"Ancienne demande {n}").as_bytes())
    # Two mails of a stranger, which the import quarantines as it would any other.
    box.add(customer_mail(subject="Bonjour", sender="someone@elsewhere.example").as_bytes())
    box.add(customer_mail(subject="Rebonjour", sender="someone@elsewhere.example").as_bytes())
    box.flush()
    command = [sys.executable, "-m", "maildesk", "--config", str(desk.config), "import", "mbox",
               str(tmp_path / "support.mbox")]  # fmt: skip
    killed = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Killed once part of the archive is stored and some of it filed.
    deadline = time.monotonic() + 60
    while counts(engine)[2] < 100:
        assert time.monotonic() < deadline, "the import made no progress"
        assert killed.poll() is None, killed.communicate()
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    inbound, waiting, tickets, outbox = counts(engine)
    assert 100 <= tickets < MAILS and outbox == 0
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    inbound, waiting, tickets, outbox = counts(engine)
    assert (inbound, waiting, tickets, outbox) == (MAILS + 2, 0, MAILS, 0)
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{MAILS + 2} mails read: ")
    assert "already there" in lines[0]
    assert "    quarantined, unknown sender: 2" in lines
    with Session(engine) as session:
        subjects = sorted(t.subject for t in session.exec(select(Ticket)))
        assert subjects == sorted(f"Ancienne demande {n}" for n in range(MAILS))
        assert {t.account_id for t in session.exec(select(Ticket))} == {1}
    assert CUSTOMER in (tmp_path / "support.mbox").read_text()


def test_a_maildir_since_a_date_and_a_missing_archive(tmp_path: Path) -> None:
    desk, engine = make_desk(tmp_path)
    box = mailbox.Maildir(tmp_path / "archive", create=True)
    old = customer_mail(subject="Vieille")
    old.replace_header("Date", "Mon, 05 Jan 2015 10:00:00 +0100")
    box.add(old.as_bytes())
    box.add(customer_mail(subject="Récente").as_bytes())
    ok = desk.cli("import", "maildir", str(tmp_path / "archive"), "--since", "2020-01-01")
    assert ok.code == 0, ok.err
    assert ok.out.splitlines()[0] == "2 mails read: 1 stored, 0 already there, 1 older than --since"
    assert "  ticket: 1" in ok.out.splitlines()
    assert counts(engine) == (1, 0, 1, 0)
    missing = desk.cli("import", "mbox", str(tmp_path / "nowhere.mbox"))
    assert (missing.code, missing.err.strip()) == (
        1, f"maildesk: error: {tmp_path / 'nowhere.mbox'}: no such mbox file")
