"""The intake runner: claims received mails in batches and files each through the pipeline.

Ingress only makes a mail durable (store/intake.py). The runner claims a batch of those rows
(store/queue.py), reads and parses each outside any transaction, then files the whole batch in
one transaction, each mail in a savepoint of its own: a mail whose filing raises rolls back
alone, and the others commit together. Its failure is counted on its row; at the third, or after
its filing killed the process three times, it is quarantined with a summary of the error, and the
mails behind it go on.

Mail stored while the runner idles needs no claim: intake stores it claimed in the runner's
name and hands it over after its commit (store/handoff.py), and the runner files it at once.

The runner's error boundary is GNU Mailman's "shunt": a bug on one mail must not stop the desk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlmodel import Session, col, select

from maildesk import metrics
from maildesk.config import Settings
from maildesk.logs import get_logger
from maildesk.mail.message import (
    IMPORT_SOURCE,
    Delivery,
    MalformedMail,
    Outcome,
    ParsedMail,
    StoreUnavailable,
)
from maildesk.mail.spool import discard_spooled
from maildesk.mail.worker import WorkerStopped
from maildesk.outbound.handoff import SendHandoff
from maildesk.outbound.notify import silenced
from maildesk.store import database
from maildesk.store.files import read_raw
from maildesk.store.intake import INTAKE_QUEUE, Arrival, IntakeHandoff, store_arrivals
from maildesk.store.models import RECEIVED, InboundMail, utcnow
from maildesk.store.queue import Claim, Clock, QueueWorker

log = get_logger("runner")

BATCH_SIZE = 20  # mails per claim and per filing transaction
# A mail larger than this is not read by the runner: the parser reads its file itself.
READ_BYTES = 1024 * 1024
# A batch's mails are all in memory at once, raw and parsed (with their attachments' bytes):
# a claim stops short of this many bytes of raw mail, so that a backlog of large mails is
# filed one or two at a time instead of twenty (a mail larger than this goes alone).
BATCH_BYTES = 8 * 1024 * 1024
LEASE = timedelta(seconds=15)
# Failures (exceptions) of a mail's filing before it is quarantined; a crash counts as a claim
# without an outcome, and INTAKE_QUEUE.poison_after of those make a mail poison.
FAILURES_BEFORE_QUARANTINE = 3
POLL_SECONDS = 5.0  # also picks up mails whose claim lapsed, or that another instance stored
_INBOUND = INTAKE_QUEUE.table.c

# Failures after which the work should simply be tried again: the database is down or busy, or
# the disk is full. Anything else is a bug or a bad mail, and counts against the mail.
_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError)


def is_temporary(exc: BaseException) -> bool:
    """Whether a failure says nothing about the mail, so that it is retried uncounted."""
    # A system error carries an errno (disk full, permission denied); other OSError
    # subclasses, such as jinja2's TemplateNotFound, are bugs in the installation.
    return isinstance(exc, (*_UNAVAILABLE, WorkerStopped)) or (
        isinstance(exc, OSError) and exc.errno is not None
        and not isinstance(exc, FileNotFoundError)
    )  # fmt: skip


class Filer(Protocol):
    """What the runner needs of the pipeline."""

    settings: Settings
    engine: sa.Engine

    def parse(self, raw: bytes) -> ParsedMail:
        """Parse within the configured bounds (MalformedMail when a bound is broken)."""

    def parse_file(self, path: Path) -> ParsedMail:
        """Parse the mail kept at `path`, as parse() does, without reading it here."""

    def file(
        self, session: Session, inbound: InboundMail, raw: bytes, delivery: Delivery,
        parsed: ParsedMail | MalformedMail | None,
    ) -> Outcome:  # fmt: skip
        """Decide for one mail and write what follows from it, in `session`."""


def instance_name(settings: Settings) -> str:
    """This instance's name in queue claims: stable across restarts, distinct per state dir."""
    if settings.desk.instance:
        return settings.desk.instance
    where = hashlib.sha256(str(settings.desk.state_dir.resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()[:80]}:{where}"


@dataclass
class _Prepared:
    """A claimed mail, read and parsed, ready to be filed."""

    inbound_id: int
    attempts: int
    delivery: Delivery
    raw: bytes = b""
    parsed: ParsedMail | MalformedMail | None = None
    error: BaseException | None = None
    started: float = 0.0
    received_at: datetime | None = None


def _delivery(row: Any) -> Delivery:
    recipients: tuple[str, ...] = ()
    if row.recipients:
        with contextlib.suppress(ValueError, TypeError):
            recipients = tuple(str(r) for r in json.loads(row.recipients))
    return Delivery(
        source=row.source, mailbox=row.mailbox, uidvalidity=row.uidvalidity, uid=row.uid,
        envelope_from=row.envelope_from, recipients=recipients, oversize=row.oversize,
    )  # fmt: skip


def _aware(value: Any) -> datetime | None:
    """A timestamp read through a RETURNING clause, as an aware UTC datetime."""
    if isinstance(value, str):  # SQLite hands back text where no column type applies.
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return None


def _summary(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


class IntakeRunner:
    """Files the intake queue's mails, a batch per transaction."""

    def __init__(
        self,
        filer: Filer,
        *,
        owner: str | None = None,
        batch_size: int = BATCH_SIZE,
        batch_bytes: int = BATCH_BYTES,
        lease: timedelta = LEASE,
        clock: Clock | None = None,
        on_filed: Callable[[], object] | None = None,
    ) -> None:
        """Run for `filer` under `owner` (default: this host and state directory)."""
        self.filer = filer
        self.engine = filer.engine
        self.state_dir = filer.settings.desk.state_dir
        self.batch_size = max(1, batch_size)
        self.batch_bytes = batch_bytes
        self.worker = QueueWorker(
            filer.engine, INTAKE_QUEUE, owner=owner or instance_name(filer.settings),
            lease=lease, clock=clock,
        )  # fmt: skip
        # Called after each batch commits: wakes the sender and the IMAP fetcher.
        self.on_filed: Callable[[], object] = on_filed or (lambda: None)
        # Claims that a lost database kept us from giving back; retried at the next round.
        self._unreleased: list[int] = []
        # This instance's sender, when it is idle, gets the batch's mail claimed for it by the
        # batch's transaction (outbound/handoff.py); set by the daemon.
        self.send_handoff: SendHandoff | None = None
        # Mail stored while we idle comes claimed for us (store/handoff.py), when the intake
        # store is given this hand-over (the daemon does): no claim of our own to wait for.
        self.handoff = IntakeHandoff(
            INTAKE_QUEUE, self.worker.owner, lease, max_items=self.batch_size,
            max_weight=batch_bytes,
        )  # fmt: skip

    def process(self, raw: bytes, delivery: Delivery) -> Outcome:
        """Store and file one mail now (the CLI and the tests): its outcome, once committed."""
        try:
            accepted = store_arrivals(self.engine, self.state_dir, [Arrival(raw, delivery)])[0]
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(str(exc)) from exc
        row_id = accepted.inbound_id
        tries = 0
        # Another instance (or thread) may hold the mail's claim: its outcome is theirs to
        # write, and this call waits for it, up to the length of a claim's lease.
        deadline = time.monotonic() + LEASE.total_seconds()
        while self._row(row_id).outcome == RECEIVED and tries <= FAILURES_BEFORE_QUARANTINE:
            if self.file_batch(only=[row_id]):
                tries += 1
            elif time.monotonic() > deadline:
                break
            else:
                time.sleep(0.01)
        row = self._row(row_id)
        if accepted.duplicate:
            return Outcome(row_id, "duplicate", row.ticket_id, row.outcome)
        return Outcome(row_id, row.outcome, row.ticket_id, row.reason)

    def _row(self, row_id: int) -> InboundMail:
        with Session(self.engine) as session:
            row = session.get(InboundMail, row_id)
            assert row is not None
            return row

    def file_batch(self, limit: int | None = None, *, only: Sequence[int] | None = None) -> int:
        """Claim up to `limit` received mails and file them; returns how many were claimed."""
        self._retry_releases()
        columns = [_INBOUND.raw_path, _INBOUND.source, _INBOUND.mailbox, _INBOUND.uidvalidity,
                   _INBOUND.uid, _INBOUND.envelope_from, _INBOUND.recipients, _INBOUND.oversize,
                   _INBOUND.received_at, _INBOUND.size]
        # A mail claimed before without an outcome is a suspect: the process may have died of
        # it, or of any other mail of its batch. Suspects are filed alone, so that each later
        # crash counts against the one mail that caused it, and good mails are not poisoned
        # by a neighbour (nor by a SIGKILL that fell in the middle of their batch).
        handed = self.handoff.take() if only is None else []
        if handed:
            claims = [Claim(mail, poison=False) for mail in handed]
            # Handed over to an idle runner: nothing else was waiting when it went idle.
            self.worker.last_picked = 0
        else:
            claims = self.worker.claim(
                limit or self.batch_size, columns,
                where=_INBOUND.id.in_(list(only)) if only else None, alone=_INBOUND.attempts > 0,
                weight=_INBOUND.size, budget=self.batch_bytes,
            )  # fmt: skip
        if not claims:
            return 0
        poison = [c for c in claims if c.poison]
        try:
            prepared = []
            renewed = time.monotonic()
            for claim in claims:
                if claim.poison:
                    continue
                prepared.append(self._prepare(claim.row))
                # Parsing a batch may take a while: the lease is renewed while work is in hand,
                # so that it can stay short and a dead instance's claims lapse soon.
                if time.monotonic() - renewed > self.worker.lease.total_seconds() / 3:
                    self.worker.renew([c.id for c in claims])
                    renewed = time.monotonic()
            try:
                self._commit(prepared, poison)
            finally:
                # Filing moved the spooled attachments it kept into the store; the rest go.
                for item in prepared:
                    discard_spooled(item.parsed)
        except BaseException as exc:
            # Nothing of the batch was written. A lost database or a stop says nothing of the
            # mails, so their attempts are given back; a bug in the runner itself counts.
            ids = [c.id for c in claims]
            uncount = is_temporary(exc) if isinstance(exc, Exception) else True
            try:
                self.worker.release(ids, uncount=uncount, error=_summary(exc))
            except Exception:
                self._unreleased.extend(ids)
            if isinstance(exc, _UNAVAILABLE):
                raise StoreUnavailable(str(exc)) from exc
            raise
        self._after_commit()
        return len(claims)

    def _after_commit(self) -> None:
        """Tell the stages that wait on filed mail (the sender, the fetcher's moves)."""
        on_commit = getattr(self.filer, "on_commit", None)
        if on_commit is not None:
            on_commit()
        self.on_filed()

    def _retry_releases(self) -> None:
        if self._unreleased:
            ids, self._unreleased = self._unreleased, []
            self.worker.release(ids, uncount=True)

    def _prepare(self, row: Any) -> _Prepared:
        """Read and parse one claimed mail, outside any transaction."""
        item = _Prepared(row.id, row.attempts, _delivery(row), started=time.monotonic(),
                         received_at=_aware(row.received_at))
        # A large mail goes to the parser by its file, so that this process never holds it.
        by_file = row.size is not None and row.size > READ_BYTES and item.delivery.oversize is None
        try:
            if not by_file:
                item.raw = read_raw(self.state_dir, row.raw_path)
        except OSError as exc:
            if is_temporary(exc):
                raise
            item.error = exc
            return item
        if item.delivery.oversize is not None:
            return item  # Only its header was taken; the pipeline reads that itself.
        try:
            if by_file:
                item.parsed = self.filer.parse_file(self.state_dir / row.raw_path)
            else:
                item.parsed = self.filer.parse(item.raw)
        except MalformedMail as exc:
            item.parsed = exc
        except Exception as exc:
            if is_temporary(exc):
                raise
            item.error = exc
        return item

    def _commit(self, prepared: list[_Prepared], poison: Sequence[Any]) -> None:
        """File the prepared mails and quarantine the poison, all in one transaction."""
        ids = [p.inbound_id for p in prepared] + [c.id for c in poison]
        outcomes: list[tuple[_Prepared, Outcome]] = []
        send = self.send_handoff
        claiming = (
            send.claiming() if send is not None and send.accepting() else contextlib.nullcontext()
        )  # fmt: skip
        with claiming, database.session_scope(self.engine) as session:
            # Renewing our claims first is the compare-and-set on them, and it is the first
            # write: pysqlite opens its transaction only at a write, and a SAVEPOINT outside a
            # transaction would commit on its release.
            session.execute(
                sa.update(INTAKE_QUEUE.table)
                .where(_INBOUND.id.in_(ids), _INBOUND.claimed_by == self.worker.owner)
                .values(lease_until=self.worker._at(self.worker.lease))
            )
            # The ledger rows we still hold, in one query; they stay in hand for the loop, so
            # that each filing's get of its own row finds it in the session.
            rows = session.exec(
                select(InboundMail).where(
                    col(InboundMail.id).in_(ids), col(InboundMail.claimed_by) == self.worker.owner
                )
            ).all()
            held = {row.id for row in rows}
            for claim in poison:
                if claim.id in held:
                    reason = "internal error: the runner stopped while filing it"
                    why = claim.row.last_error or f"claimed {claim.row.attempts - 1} times"
                    outcomes.append((_Prepared(claim.id, claim.row.attempts, _delivery(claim.row),
                                               started=time.monotonic()),
                                     self._quarantine(session, claim.id, reason, why)))
            for item in prepared:
                if item.inbound_id not in held:
                    continue  # Our lease lapsed and another worker has it now.
                if item.error is None:
                    outcome = self._file_in_savepoint(session, item)
                    if outcome is not None:
                        outcomes.append((item, outcome))
                        continue
                assert item.error is not None
                outcomes.append((item, self._failed(session, item)))
            del rows
        filed_at = utcnow()
        for item, outcome in outcomes:
            metrics.MAILS_FILED.labels(outcome.outcome).inc()
            if item.received_at is not None and outcome.outcome != RECEIVED:
                metrics.FILING_SECONDS.observe((filed_at - item.received_at).total_seconds())
            log.info(
                "mail processed", source=item.delivery.source, inbound=outcome.inbound_id,
                outcome=outcome.outcome, ticket=outcome.ticket_id, reason=outcome.reason,
                attempt=item.attempts, ms=round((time.monotonic() - item.started) * 1000, 1),
            )  # fmt: skip

    def _file_in_savepoint(self, session: Session, item: _Prepared) -> Outcome | None:
        """File one mail in its own savepoint; None (and item.error set) if it failed."""
        savepoint = session.begin_nested()
        try:
            inbound = session.get(InboundMail, item.inbound_id)
            assert inbound is not None
            # A mail from an archive import is filed like any other, and tells nobody.
            past = item.delivery.source == IMPORT_SOURCE
            # The claim ends with the filing, in its savepoint: set first, it is written in the
            # same UPDATE as the filing's first change to the row.
            inbound.claimed_by, inbound.lease_until = None, None
            session.add(inbound)
            with silenced() if past else contextlib.nullcontext():
                outcome = self.filer.file(session, inbound, item.raw, item.delivery, item.parsed)
            savepoint.commit()
            return outcome
        except Exception as exc:
            savepoint.rollback()
            if is_temporary(exc):
                raise
            log.exception("mail failed", inbound=item.inbound_id, attempt=item.attempts)
            item.error = exc
            return None

    def _failed(self, session: Session, item: _Prepared) -> Outcome:
        """Count a failure on the mail's row; at the last allowed one, quarantine it."""
        assert item.error is not None
        summary = _summary(item.error)
        if item.attempts >= FAILURES_BEFORE_QUARANTINE:
            reason = f"internal error: {type(item.error).__name__}"
            return self._quarantine(session, item.inbound_id, reason, summary)
        session.execute(
            sa.update(INTAKE_QUEUE.table)
            .where(self.worker.held(item.inbound_id))
            .values(**self.worker.release_values(error=summary))
        )
        return Outcome(item.inbound_id, RECEIVED, None, f"failed, will retry: {summary[:200]}")

    def _quarantine(self, session: Session, row_id: int, reason: str, error: str) -> Outcome:
        session.execute(
            sa.update(INTAKE_QUEUE.table)
            .where(self.worker.held(row_id))
            .values(**self.worker.release_values(error=error), outcome="quarantined",
                    reason=reason, processed_at=utcnow())
        )  # fmt: skip
        return Outcome(row_id, "quarantined", None, reason)

    def _round(self) -> int:
        """One batch: 1 if more mails may wait, 0 if the queue looked empty, -1 on an outage."""
        try:
            claimed = self.file_batch()
        except StoreUnavailable as exc:
            log.warning("store unavailable", stage="runner", error=str(exc))
            return -1
        # A suspect is claimed alone, but others may wait behind it.
        return 1 if claimed and self.worker.last_picked >= self.batch_size else 0

    async def run(self, stop: asyncio.Event, wake: asyncio.Event) -> None:
        """File mails until `stop` is set; `wake` (set after each intake commit) starts at once."""
        # The parser's child starts before any claim: a claim counts as an attempt, and a
        # crash while a child starts would otherwise count against the mail waiting for it.
        warm = getattr(self.filer, "warm", None)
        if warm is not None:
            try:
                await asyncio.to_thread(warm)
            except WorkerStopped:
                return
        taken = await asyncio.to_thread(self.worker.take_back)
        if taken:
            log.info("runner.took_back", count=taken)
        while not stop.is_set():
            wake.clear()
            try:
                more = await asyncio.to_thread(self._round)
            except WorkerStopped:
                break
            except Exception:
                log.exception("runner.round_failed")
                more = -1
            if more > 0:
                continue
            self.handoff.set_idle(True)
            try:
                await _wait_any([stop, wake], POLL_SECONDS if more == 0 else 1.0)
            finally:
                self.handoff.set_idle(False)


async def _wait_any(events: list[asyncio.Event], timeout: float) -> None:
    """Return when any of `events` is set or after `timeout` seconds."""
    tasks = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
