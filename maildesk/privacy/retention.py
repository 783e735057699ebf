"""Retention: what the privacy notice says is kept no longer is erased, daily.

- an account whose deactivation is more than `[privacy] retention_years` years old, with
  everything of theirs (see erase.py);
- mail from strangers (senders with no account) that is on no ticket, quarantined mostly, after
  `[privacy] quarantine_days` days, with their copies in the IMAP folders and the mails we sent
  to those strangers;
- audit events after `[privacy] audit_days` days;
- files in the content store that no row refers to (left by a crash before a commit), once a
  day old.

Each part is an erasure of its own (IMAP, rows, files, in that order), so a run killed at any
point leaves a consistent store, and the next run finishes the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import Session, col, select

from maildesk.config import Settings
from maildesk.logs import get_logger
from maildesk.privacy import erase
from maildesk.store import database
from maildesk.store.files import ATTACHMENTS_DIR, RAW_DIR, SPOOL_DIR
from maildesk.store.models import (
    Account,
    Agent,
    Attachment,
    AuditEvent,
    InboundMail,
    Outbox,
    utcnow,
)

log = get_logger("retention")

ACTOR = "retention"
# A file may be written a moment before the row that refers to it commits: only files older
# than this, with no row, are orphans.
ORPHAN_GRACE = timedelta(days=1)
DAY = timedelta(days=1)
# A row that a sender holds right now is left for the next run.
_SENDING = "sending"


def add_years(moment: datetime, years: int) -> datetime:
    """`moment` plus whole years; 29 February becomes 28 February (never kept longer)."""
    try:
        return moment.replace(year=moment.year + years)
    except ValueError:
        return moment.replace(year=moment.year + years, day=28)


def erase_after(account: Account, settings: Settings) -> datetime | None:
    """When the account's data are due for erasure; None while it is active."""
    if account.deactivated_at is None:
        return None
    return add_years(account.deactivated_at, settings.privacy.retention_years)


@dataclass
class RetentionReport:
    """What a run erased, or would erase when `dry_run`."""

    dry_run: bool
    accounts: list[tuple[str, str]] = field(default_factory=list)  # (pseudonym, email)
    counts: dict[str, int] = field(default_factory=dict)
    stranger_mails: int = 0
    stranger_outbox: int = 0
    audit_events: int = 0
    files: int = 0
    imap_deleted: int = 0
    imap_not_found: list[str] = field(default_factory=list)

    def add(self, report: erase.ErasureReport) -> None:
        """Count one erasure in."""
        for kind, count in report.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + count
        self.files += report.files_deleted
        self.imap_deleted += report.imap_deleted
        self.imap_not_found += report.imap_not_found

    def summary(self) -> dict[str, object]:
        """The counts, without any address: what the daemon logs."""
        return {"accounts": len(self.accounts), **self.counts,
                "stranger_mails": self.stranger_mails, "stranger_outbox": self.stranger_outbox,
                "audit_events": self.audit_events, "files": self.files,
                "imap_deleted": self.imap_deleted, "imap_not_found": len(self.imap_not_found)}


def due_accounts(session: Session, settings: Settings, now: datetime) -> list[Account]:
    """The accounts deactivated more than retention_years years before `now`."""
    query = select(Account).where(col(Account.deactivated_at).is_not(None)).order_by(
        col(Account.id))
    return [a for a in session.exec(query) if (erase_after(a, settings) or now) < now]


def _known_addresses(session: Session) -> set[str]:
    return {e.lower() for e in session.exec(select(Account.email))} | {
        e.lower() for e in session.exec(select(Agent.email))}


def stranger_target(session: Session, settings: Settings, now: datetime,
                    senders: dict[int, set[str]]) -> erase.Target:
    """The strangers' mails on no ticket, and our mails to strangers, past quarantine_days."""
    cutoff = now - timedelta(days=settings.privacy.quarantine_days)
    accounts = {e.lower() for e in session.exec(select(Account.email))}
    old = set(session.exec(select(InboundMail.id).where(InboundMail.received_at < cutoff)))
    mails = {i for i, found in senders.items() if i in old and not found & accounts}
    known = _known_addresses(session)
    outbox = set()
    query = select(Outbox).where(col(Outbox.ticket_id).is_(None), Outbox.status != _SENDING,
                                 col(Outbox.created_at) < cutoff)
    for row in session.exec(query):
        try:
            recipients = {str(r).lower() for r in json.loads(row.recipients)}
        except (ValueError, TypeError):
            recipients = set()
        if not recipients & known:
            outbox.add(row.id)
    return erase.mails_target(session, "strangers", mails, outbox)  # type: ignore[arg-type]


def _old_audit(session: Session, settings: Settings, now: datetime) -> sa.ColumnElement[bool]:
    return col(AuditEvent.at) < now - timedelta(days=settings.privacy.audit_days)


def sweep_orphans(settings: Settings, engine: sa.Engine, now: datetime, dry_run: bool) -> int:
    """Delete files of the content store that no row refers to, once ORPHAN_GRACE old.

    Also the leftovers of a process that died while writing: half-written files of the store
    and the spool's decoded attachments and composed mails, which hold personal data too.
    """
    state_dir = settings.desk.state_dir
    with Session(engine) as session:
        raw = {Path(p).name for p in session.exec(select(InboundMail.raw_path))}
        attached = set(session.exec(select(Attachment.sha256)))
    found: list[Path] = []
    for kind, kept in ((RAW_DIR, raw), (ATTACHMENTS_DIR, attached)):
        found += [path for path in (state_dir / kind).glob("*/*") if path.name not in kept]
        found += (state_dir / kind).glob(".tmp-*")  # A RawWriter's, beside the digests' folders.
    found += (state_dir / SPOOL_DIR).glob("*")
    count = 0
    for path in dict.fromkeys(found):
        try:
            written = datetime.fromtimestamp(path.stat().st_mtime, tz=now.tzinfo)
        except FileNotFoundError:
            continue
        if path.is_file() and now - written > ORPHAN_GRACE:
            count += 1
            if not dry_run:
                path.unlink(missing_ok=True)
    return count


def run_retention(
    settings: Settings, engine: sa.Engine, *, now: datetime | None = None,
    dry_run: bool = False, actor: str = ACTOR, hook: erase.Hook | None = None,
) -> RetentionReport:
    """Erase everything whose retention has ended at `now` (or say what, when `dry_run`)."""
    now = now or utcnow()
    report = RetentionReport(dry_run)
    if not dry_run:
        report.files += erase.finish_pending(settings, engine)
    with Session(engine) as session:
        accounts = [(a.id, a.email) for a in due_accounts(session, settings, now)]
        senders = erase.ticketless_senders(session, settings.desk.state_dir)
    for account_id, email in accounts:
        with Session(engine) as session:
            account = session.get(Account, account_id)
            if account is None:
                continue  # Erased meanwhile, by `privacy erase` say.
            target = erase.account_target(session, settings, account, senders)
        report.accounts.append((target.pseudonym, email))
        if dry_run:
            report.add(erase.ErasureReport(target.pseudonym, target.counts(), dry_run=True))
            continue
        report.add(erase.execute(settings, engine, target, actor=actor,
                                 action="retention.erase", now=now, hook=hook))
        senders = {i: found for i, found in senders.items() if i not in target.inbound}
    with Session(engine) as session:
        strangers = stranger_target(session, settings, now, senders)
    report.stranger_mails, report.stranger_outbox = len(strangers.inbound), len(strangers.outbox)
    if not dry_run and (strangers.inbound or strangers.outbox):
        done = erase.execute(settings, engine, strangers, actor=actor, action="retention.purge",
                             now=now, hook=hook)
        report.files += done.files_deleted
        report.imap_deleted += done.imap_deleted
        report.imap_not_found += done.imap_not_found
    with database.session_scope(engine) as session:
        old = _old_audit(session, settings, now)
        report.audit_events = session.exec(
            select(sa.func.count()).select_from(AuditEvent).where(old)).one()
        if not dry_run and report.audit_events:
            if engine.dialect.name == "sqlite":
                session.connection().exec_driver_sql("PRAGMA secure_delete = ON")
            session.execute(sa.delete(AuditEvent).where(old))
    report.files += sweep_orphans(settings, engine, now, dry_run)
    if not dry_run:
        erase.truncate_wal(engine)
    return report


async def run_daily(
    settings: Settings, engine: sa.Engine, stop: asyncio.Event,
    clock: Callable[[], datetime] = utcnow, *, interval: timedelta = DAY,
) -> None:
    """Run retention now and then every `interval` until `stop` is set; a failure is logged
    and the next run tries again.
    """
    while not stop.is_set():
        try:
            report = await asyncio.to_thread(run_retention, settings, engine, now=clock())
            log.info("retention.run", **report.summary())
        except Exception as exc:
            log.exception("retention.failed", error=type(exc).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval.total_seconds())
