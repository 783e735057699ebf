"""Retention with an injected clock, on SQLite and PostgreSQL with the rig's Dovecot."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import (
    CLAIRE,
    MARC,
    STRANGER,
    Scene,
    build_scene,
    imap_bytes,
    places_holding,
    state_bytes,
)
from e2e import COLLEAGUE, CUSTOMER
from rig.dovecot import DovecotServer
from sqlmodel import Session, select
from support_fixtures import make_pipeline

from maildesk.privacy import retention
from maildesk.privacy.erase import PENDING_DIR
from maildesk.privacy.retention import add_years, run_daily, run_retention
from maildesk.store import database
from maildesk.store.models import AuditEvent

DEACTIVATED = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
FIVE_YEARS = add_years(DEACTIVATED, 5)


def test_years_are_counted_on_the_calendar() -> None:
    assert add_years(datetime(2024, 2, 29, tzinfo=UTC), 5) == datetime(2029, 2, 28, tzinfo=UTC)
    assert add_years(datetime(2026, 3, 1, 12, tzinfo=UTC), 5) == datetime(2031, 3, 1, 12,
                                                                          tzinfo=UTC)


def test_one_day_before_five_years_the_account_stays_and_one_day_after_it_goes(
    scene: Scene,
) -> None:
    scene.deactivate_claire(DEACTIVATED)
    early = run_retention(scene.settings, scene.engine, now=FIVE_YEARS - timedelta(days=1))
    assert early.accounts == [] and CUSTOMER in scene.accounts()
    assert scene.claire_ticket in scene.tickets()
    assert len([m for m in imap_bytes(scene.imap) if any(n in m for n in CLAIRE)]) == 5
    # The stranger's mail was due long before: it went, with its IMAP copy and our answer.
    assert early.stranger_mails == 1 and early.stranger_outbox == 1
    assert places_holding(scene, (STRANGER.encode(),)) == []

    late = run_retention(scene.settings, scene.engine, now=FIVE_YEARS + timedelta(days=1))
    assert [email for _, email in late.accounts] == [CUSTOMER]
    assert late.counts["tickets"] == 1 and late.imap_deleted == 5 and late.imap_not_found == []
    assert places_holding(scene, CLAIRE) == []
    assert COLLEAGUE in scene.accounts() and scene.tickets() == {scene.marc_ticket}
    assert len(places_holding(scene, MARC)) >= 3


def test_a_second_run_finds_nothing_more(scene: Scene) -> None:
    scene.deactivate_claire(DEACTIVATED)
    now = FIVE_YEARS + timedelta(days=1)
    run_retention(scene.settings, scene.engine, now=now)
    again = run_retention(scene.settings, scene.engine, now=now)
    assert (again.accounts, again.stranger_mails, again.files) == ([], 0, 0)
    assert sum(again.counts.values()) == 0


def test_a_dry_run_names_the_accounts_and_erases_nothing(scene: Scene) -> None:
    scene.deactivate_claire(DEACTIVATED)
    before = state_bytes(scene.state_dir).keys() - {"maildesk.sqlite3-wal"}
    planned = run_retention(scene.settings, scene.engine, now=FIVE_YEARS + timedelta(days=1),
                            dry_run=True)
    assert [email for _, email in planned.accounts] == [CUSTOMER]
    assert planned.counts["tickets"] == 1 and planned.stranger_mails == 1
    assert planned.audit_events > 0
    assert CUSTOMER in scene.accounts() and len(imap_bytes(scene.imap)) == 7
    assert state_bytes(scene.state_dir).keys() - {"maildesk.sqlite3-wal"} == before


def test_audit_events_are_kept_for_audit_days(scene: Scene) -> None:
    with Session(scene.engine) as session:
        newest = max(session.exec(select(AuditEvent.at)))
        total = len(session.exec(select(AuditEvent)).all())
    kept = run_retention(scene.settings, scene.engine, now=newest + timedelta(days=364))
    assert kept.audit_events == 0
    gone = run_retention(scene.settings, scene.engine, now=newest + timedelta(days=366))
    assert gone.audit_events >= total
    with Session(scene.engine) as session:
        left = session.exec(select(AuditEvent)).all()
    # Only the retention runs' own events, dated by their clock, are left.
    assert {e.action for e in left} == {"retention.purge"}


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, and no handler catches it."""


def fingerprint(scene: Scene) -> tuple[dict[str, int], dict[str, int], int]:
    """Rows per table, files per kind, and mails in the IMAP folders."""
    with scene.engine.connect() as connection:
        tables = {name: connection.execute(sa.text(f'SELECT count(*) FROM "{name}"')).scalar_one()  # noqa: S608
                  for name in sa.inspect(connection).get_table_names() if name != "auditevent"}
    files: dict[str, int] = {}
    for name in state_bytes(scene.state_dir):
        kind = name.split("/")[0]
        files[kind] = files.get(kind, 0) + 1
    return tables, files, len(imap_bytes(scene.imap))


def _sqlite_scene(tmp_path: Path, dovecot: DovecotServer) -> Scene:
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    engine = database.make_engine(url)
    database.upgrade(engine)
    scene = build_scene(make_pipeline(engine, tmp_path), engine, dovecot.add_user())
    scene.deactivate_claire(DEACTIVATED)
    return scene


@pytest.mark.parametrize("step", ["imap", "rows", "files"])
def test_a_run_killed_after_any_step_and_run_again_ends_as_a_clean_run(
    tmp_path: Path, dovecot_server: DovecotServer, step: str,
) -> None:
    now = FIVE_YEARS + timedelta(days=1)
    clean = _sqlite_scene(tmp_path / "clean", dovecot_server)
    run_retention(clean.settings, clean.engine, now=now)
    killed = _sqlite_scene(tmp_path / "killed", dovecot_server)

    def kill(reached: str) -> None:
        if reached == step:
            raise Killed

    with pytest.raises(Killed):
        run_retention(killed.settings, killed.engine, now=now, hook=kill)
    assert places_holding(killed, CLAIRE) != [], "killed before the end, something is left"
    run_retention(killed.settings, killed.engine, now=now)
    assert fingerprint(killed) == fingerprint(clean)
    assert places_holding(killed, CLAIRE) == []
    assert not list((killed.state_dir / PENDING_DIR).glob("*"))
    clean.engine.dispose()
    killed.engine.dispose()


async def test_the_daily_run_erases_on_its_first_round_and_stops_when_told(
    scene: Scene,
) -> None:
    scene.deactivate_claire(DEACTIVATED)
    stop = asyncio.Event()
    task = asyncio.create_task(run_daily(scene.settings, scene.engine, stop,
                                         clock=lambda: FIVE_YEARS + timedelta(days=1)))
    deadline = time.monotonic() + 30
    while CUSTOMER in scene.accounts():
        assert time.monotonic() < deadline, "the daily run erased nothing"
        assert not task.done(), task
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 30)
    assert places_holding(scene, CLAIRE) == []


def test_an_account_still_active_is_never_due(scene: Scene) -> None:
    with Session(scene.engine) as session:
        assert retention.due_accounts(session, scene.settings,
                                      datetime(2200, 1, 1, tzinfo=UTC)) == []


def test_leftovers_of_a_dead_process_go_after_a_day_and_stored_files_stay(scene: Scene) -> None:
    state = scene.state_dir
    kept = sorted(p for p in state.glob("*/*/*") if p.is_file())
    assert kept  # The scene's raw mails and attachments, which rows refer to.
    (state / "spool").mkdir(exist_ok=True)
    left = [state / "spool" / "part-abc", state / "spool" / "out-def", state / "raw" / ".tmp-1",
            state / "attachments" / "ab" / ("0" * 64)]  # fmt: skip
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"a customer's attachment, decoded")
    now = datetime.now(UTC)
    assert retention.sweep_orphans(scene.settings, scene.engine, now, dry_run=False) == 0
    tomorrow = now + retention.ORPHAN_GRACE + timedelta(minutes=1)
    assert retention.sweep_orphans(scene.settings, scene.engine, tomorrow, dry_run=True) == 4
    assert retention.sweep_orphans(scene.settings, scene.engine, tomorrow, dry_run=False) == 4
    assert [p for p in left if p.exists()] == []
    assert sorted(p for p in state.glob("*/*/*") if p.is_file()) == kept
