"""The send stage: deliver the outbox's due mails by SMTP or into a maildir.

The outbox is a queue (store/queue.py). A sender claims the oldest due rows a batch at a time,
in one short transaction, marking them "sending" under its name with a lease on the database's
clock; only then does it talk to the server, one row after the other over one connection, and it
records the outcomes a group at a time (every RECORD_ROWS rows or RECORD_SECONDS, whichever comes
first, and at the end of the claim). Claimed rows it did not try (the server is unreachable, or
the claim has used half its lease) are given back as they were. While the sender idles, the
transaction that queues mail claims it for the sender and hands it over after its commit
(outbound/handoff.py): the first mails after a quiet spell, acknowledgements mostly, go out
without a claim transaction of their own.

A mail is given up on by time, never by a count: a relay that is down, slow or refusing our
password for hours costs nothing but retries, 1 minute doubling to 1 hour with jitter, until the
mail's deadline (`[smtp] give_up_days` after it was queued). A 5xx answer is final at once. A mail
given up on is recorded on its ticket, and the ticket's agents are told once (see `on_give_up`).

Few write transactions matter on SQLite: each one queues for the database's single write lock,
which intake and the runner take too, and a sender that took the lock twice per mail sent only a
few mails a second during a burst of incoming mail.

Delivery is therefore at least once, never at most once: a crash (or a lost database) between the
server's 250 and our commit sends the mail again, at once after a restart (the instance takes its
own claims back) or once the lease lapses for another instance; so does a connection dropped after
the server took the mail but before it answered. Since outcomes are recorded a group at a time, a
crash in the middle of a claim sends again the rows of the group not yet recorded (at most
RECORD_ROWS rows, or RECORD_SECONDS' worth of sending, plus the row on the wire). The Message-ID
is the same both times, so mail clients thread the copies together and most hide the duplicate.
A row whose sending killed the sender three times is failed rather than sent forever.
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from maildesk import metrics
from maildesk.config import Settings
from maildesk.logs import get_logger
from maildesk.outbound.compose import outgoing_mail
from maildesk.outbound.compose_worker import ComposeAhead, drop
from maildesk.outbound.handoff import HandedOutbox, SendHandoff
from maildesk.outbound.transport import (
    MaildirTransport,
    PermanentFailure,
    SmtpTransport,
    TemporaryFailure,
    Unreachable,
    describe,
    refusals,
)
from maildesk.store.models import Agent, Company, Outbox, Ticket, utcnow
from maildesk.store.queue import Clock, Queue, QueueWorker, backoff

log = get_logger("send")

LEASE = timedelta(seconds=30)
RETRY_FIRST = timedelta(minutes=1)
RETRY_MOST = timedelta(hours=1)
# Claims of one row that ended without an outcome (its sender died) before it is failed.
CRASHES_BEFORE_FAILED = 3
# Rows claimed in one transaction; a claim is sent over one connection. On SQLite each claim
# waits for its turn at the write lock, which the runner may hold for a batch (a few hundred ms):
# claims of 200 keep that wait small beside the sending, and the lease is renewed as they go.
CLAIM_SIZE = 200
# Outcomes are committed every RECORD_ROWS rows or RECORD_SECONDS, whichever comes first: this
# bounds both the write transactions per mail and the mails sent again after a crash.
RECORD_ROWS = 20
RECORD_SECONDS = 0.5
# A connection kept between batches is used again only this soon after its last batch (relays
# close idle sessions after a few minutes: Postfix after 300 s), and only if it answers a NOOP.
KEEP_CONNECTION_SECONDS = 60.0
_OUTBOX: sa.Table = Outbox.metadata.tables["outbox"]
_ROW = _OUTBOX.c
OUTBOX_QUEUE = Queue(
    table=_OUTBOX,
    wanted=_ROW.status.in_(("pending", "sending")),
    on_claim={"status": "sending"},
    on_release={"status": "pending"},
    # The sender judges crashes itself: attempts minus deferrals are the claims that ended
    # without an outcome.
    poison_after=2**31,
)

# Called in the transaction that gives up on a mail: (session, outbox id, reason).
GiveUpHook = Callable[[Session, int, str], None]


@dataclass(frozen=True)
class SendReport:
    """How many mails one batch sent, left for a retry, and gave up on."""

    sent: int = 0
    retried: int = 0
    failed: int = 0


def _safe_recipients(row: Any) -> list[str]:
    try:
        return [a.lower() for a in _recipients(row.recipients)]
    except PermanentFailure:
        return []


def _recipients(text: str) -> list[str]:
    """The envelope recipients stored as a JSON list of addresses."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise PermanentFailure("recipients are not a non-empty JSON list of addresses")
    return value


class OutboxSender:
    """Sends the outbox's due mails and records each outcome on its row."""

    def __init__(
        self,
        settings: Settings,
        engine: sa.Engine,
        *,
        retry_base: timedelta = RETRY_FIRST,
        retry_most: timedelta = RETRY_MOST,
        give_up_after: timedelta | None = None,
        lease: timedelta = LEASE,
        poll_seconds: float = 5.0,
        timeout: float = 60.0,
        claim_size: int = CLAIM_SIZE,
        owner: str = "sender",
        clock: Clock | None = None,
        on_give_up: GiveUpHook | None = None,
        compose_ahead: bool = False,
        keep_connection: bool = False,
        handoff: SendHandoff | None = None,
    ) -> None:
        """Prepare a sender; `retry_base` is the first backoff, doubled at each retry."""
        self.settings = settings
        self.engine = engine
        self.retry_base = retry_base
        self.retry_most = retry_most
        self.give_up_after = give_up_after or timedelta(days=settings.smtp.give_up_days)
        self.lease = lease
        self.poll_seconds = poll_seconds
        self.timeout = timeout
        self.claim_size = max(1, claim_size)
        self.clock = clock
        self.on_give_up = on_give_up
        self.queue = QueueWorker(engine, OUTBOX_QUEUE, owner=owner, lease=lease, clock=clock)
        self._withheld: set[int] = set()
        self._ssl_context: ssl.SSLContext | None = None
        # With `compose_ahead`, a child process composes a claim's drafts while the rows before
        # them are sent (compose_worker.py); the ids of the rows it is composing, in order.
        self._ahead = ComposeAhead(settings.desk.state_dir) if compose_ahead else None
        self._ahead_ids: collections.deque[int] = collections.deque()
        self._record_thread: ThreadPoolExecutor | None = None
        # With `keep_connection`, the SMTP connection outlives its batch, for the next one.
        self.keep_connection = keep_connection
        self._kept: tuple[SmtpTransport, float] | None = None
        # Rows claimed for us by the transaction that queued them, while we were idle.
        self.handoff = handoff

    def _now(self) -> datetime:
        return self.clock() if self.clock is not None else utcnow()

    def _tls_context(self) -> ssl.SSLContext:
        """The context for "ssl" and "starttls", built once: loading the CAs takes ~50 ms."""
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _transport(self) -> SmtpTransport | MaildirTransport:
        if self.settings.smtp.transport == "maildir":
            return MaildirTransport(self.settings.outgoing_maildir)
        return SmtpTransport(self.settings, self.timeout, self._tls_context)

    def _kept_transport(self) -> SmtpTransport | MaildirTransport:
        """The connection kept from the last batch if it is recent and still answers, else a
        new transport: an acknowledgement then waits for no TCP, TLS and AUTH handshake."""
        kept, self._kept = self._kept, None
        if kept is not None:
            transport, since = kept
            if time.monotonic() - since < KEEP_CONNECTION_SECONDS and transport.still_open():
                return transport
            transport.close()
        return self._transport()

    def take_back(self) -> int:
        """At start-up: make this sender's unfinished claims due at once."""
        return self.queue.take_back()

    def _claim(self, size: int, skip: list[int]) -> list[Any]:
        """Lease up to `size` of the oldest due rows not in `skip`."""
        # What sending needs of a row besides its id, attempts and last error; a hand-over
        # carries the same (handoff.HandedOutbox).
        columns = [_ROW.kind, _ROW.message_id, _ROW.mail_from, _ROW.recipients, _ROW.raw,
                   _ROW.draft, _ROW.deferrals, _ROW.created_at, _ROW.ticket_id]
        # A row claimed before without an outcome is a suspect (its sender died with it, or
        # with another row of its claim): suspects go alone, so that a crash counts against
        # the one row on the wire, never against the whole claim.
        claims = self.queue.claim(
            size, columns, where=_ROW.id.not_in(skip) if skip else None,
            alone=_ROW.attempts > _ROW.deferrals,
        )  # fmt: skip
        return [claim.row for claim in claims]

    def _handed_over(self) -> tuple[list[HandedOutbox], float]:
        """The rows claimed for us by the transactions that queued them (see handoff.py) with
        at least half their lease left, and when the oldest was claimed (time.monotonic());
        the others go back, uncounted, to be claimed afresh."""
        handoff = self.handoff
        handed = handoff.take() if handoff is not None else []
        if handoff is None or not handed:
            return [], 0.0
        now = handoff.monotonic()
        half = handoff.lease.total_seconds() / 2
        fresh = [row for row in handed if now - row.claimed_at < half]
        late = [row.id for row in handed if now - row.claimed_at >= half]
        if late:
            # Handed over too late (the sender was busy for half a lease): a fresh claim
            # takes them now rather than when the lease runs out.
            self.queue.release(late, uncount=True)
        oldest = min((row.claimed_at for row in fresh), default=now)
        return fresh, time.monotonic() - (now - oldest)

    def _us_restricted(self, rows: list[Any]) -> set[int]:
        """The claimed rows that would carry a ticket's content to a US agent whose company
        has no after-hours support now, whatever held when they were queued."""
        candidates = {row.id: row for row in rows if row.ticket_id is not None}
        if not candidates:
            return set()
        ticket = Ticket.metadata.tables["ticket"].c
        company = Company.metadata.tables["company"].c
        agent = Agent.metadata.tables["agent"].c
        with self.engine.connect() as conn:
            open_to_us = dict(conn.execute(
                sa.select(ticket.id, company.after_hours)
                .join_from(Ticket.metadata.tables["ticket"], Company.metadata.tables["company"],
                           ticket.company_id == company.id)
                .where(ticket.id.in_({row.ticket_id for row in candidates.values()}))
            ).all())  # fmt: skip
            addresses = {a for row in candidates.values() for a in _safe_recipients(row)}
            us_agents = set(conn.execute(
                sa.select(agent.email).where(agent.email.in_(addresses), agent.region == "us")
            ).scalars()) if addresses else set()  # fmt: skip
        return {
            row_id for row_id, row in candidates.items()
            if not open_to_us.get(row.ticket_id, False)
            and any(a.lower() in us_agents for a in _safe_recipients(row))
        }  # fmt: skip

    def _record(
        self, results: list[tuple[Any, dict[str, Any], str | None]], renew: list[int] | None = None
    ) -> None:
        """Commit the outcomes gathered so far in one transaction, and forget them; renew the
        lease on the rows in `renew` in the same transaction."""
        if not results:
            return
        with self.engine.begin() as conn:
            if renew:
                conn.execute(
                    sa.update(_OUTBOX)
                    .where(_ROW.id.in_(renew), _ROW.claimed_by == self.queue.owner)
                    .values(lease_until=self.queue._at(self.lease))
                )
            gave_up = []
            # Rows whose outcomes set the same columns go in one executemany: one statement
            # built, and on PostgreSQL one round trip, instead of one of each per mail.
            alike: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for row, values, give_up in results:
                released = self.queue.release_values(**values)
                plain = not any(isinstance(v, sa.ClauseElement) for v in released.values())
                if give_up is None and plain:
                    # Parameters named apart from the columns, which SET reserves for itself.
                    alike.setdefault(tuple(sorted(released)), []).append(
                        {"row_id": row.id, **{f"new_{k}": v for k, v in released.items()}}
                    )
                    continue
                done = conn.execute(
                    sa.update(_OUTBOX).where(self.queue.held(row.id)).values(**released)
                )
                if give_up is not None and done.rowcount and row.ticket_id is not None:
                    gave_up.append((row.id, give_up))
            for columns, params in alike.items():
                conn.execute(
                    sa.update(_OUTBOX)
                    .where(_ROW.id == sa.bindparam("row_id"), _ROW.claimed_by == self.queue.owner)
                    .values({name: sa.bindparam(f"new_{name}") for name in columns}),
                    params,
                )
            if gave_up and self.on_give_up is not None:
                with Session(bind=conn) as session:
                    for row_id, reason in gave_up:
                        self.on_give_up(session, row_id, reason)
                    session.flush()
        results.clear()

    def send_batch(self, limit: int = 100) -> SendReport:
        """Send up to `limit` due mails over one connection and record each outcome."""
        counts = {"sent": 0, "retry": 0, "failed": 0}
        # A row is tried once per batch, even when its retry is due at once.
        tried: list[int] = []
        transport = self._kept_transport()
        try:
            handed, handed_at = self._handed_over()
            tried.extend(row.id for row in handed)
            # True when the server is unreachable: then no claim is worth making now.
            stopped = bool(handed) and self._send_claims(transport, handed, counts, handed_at)
            while not stopped and len(tried) < limit:
                size = min(self.claim_size, limit - len(tried))
                rows = self._claim(size, tried)
                tried.extend(row.id for row in rows)
                # When nothing else was due, rows that come later wake the next batch. A claim
                # may come back short because another sender took rows between our SELECT and
                # UPDATE: only a short pick ends the batch.
                more = self.queue.last_picked >= size
                if self._send_claims(transport, rows, counts) or not more:
                    break
        except BaseException:
            transport.close()
            raise
        if self.keep_connection and isinstance(transport, SmtpTransport):
            self._kept = (transport, time.monotonic())
        else:
            transport.close()
        return SendReport(sent=counts["sent"], retried=counts["retry"], failed=counts["failed"])

    def _send_claims(
        self, transport: SmtpTransport | MaildirTransport, rows: list[Any],
        counts: dict[str, int], claimed_at: float | None = None,
    ) -> bool:  # fmt: skip
        """Send claimed rows and record their outcomes by groups; True means stop the batch.
        `claimed_at` (time.monotonic()) is when the claim was made, if not just now.

        A crash here leaves the rows whose outcome was not yet committed "sending": they are
        sent (again, for those already sent) after a restart. Grouping bounds how many that can
        be; see the module's docstring.
        """
        results: list[tuple[Any, dict[str, Any], str | None]] = []
        self._ahead_ids = collections.deque()
        if self._ahead is not None and self._ahead.start_claim([row.draft for row in rows]):
            self._ahead_ids.extend(row.id for row in rows if row.draft is not None)
        # Read while the child composes: the rule is checked on the database's facts of now.
        self._withheld = self._us_restricted(rows)
        grouped_at = time.monotonic()
        claimed_at = grouped_at if claimed_at is None else claimed_at
        untried = 0  # Index of the first claim not yet handed to the transport.
        stop = False
        # Groups are recorded by a thread of their own while sending goes on: on SQLite a
        # record may wait for the write lock as long as the runner's batch holds it, and the
        # relay need not wait with it. One group at a time, in order.
        recording: list[Future[None]] = []  # The group being recorded, if any.

        def record_behind(renew: list[int]) -> None:
            if recording:
                recording.pop().result()
            group = results[:]
            results.clear()
            recording.append(self._recorder().submit(self._record, group, renew))

        try:
            for index, row in enumerate(rows):
                # The lease must outlast the send: a row started with less than half of it
                # left could be claimed and sent by another sender while we are still at it.
                if time.monotonic() - claimed_at > self.lease.total_seconds() / 2:
                    log.warning("claim outlived half its lease", left=len(rows) - index)
                    break
                untried = index + 1
                outcome, values, give_up, stop = self._deliver(transport, row)
                counts[outcome] += 1
                metrics.SEND_RESULTS.labels(outcome).inc()
                if outcome == "sent":
                    metrics.DELIVERY_SECONDS.observe((self._now() - row.created_at).total_seconds())
                if not results:
                    grouped_at = time.monotonic()
                results.append((row, values, give_up))
                if stop:
                    # The server is unreachable: the other rows wait for the next batch,
                    # rather than each spending a timeout on it now.
                    break
                if len(results) >= RECORD_ROWS or time.monotonic() - grouped_at >= RECORD_SECONDS:
                    # The rest of the claim is renewed in the same transaction: the lease
                    # stays short, so that a dead sender's claims lapse soon, and a long claim
                    # still outlives its sending. The lease then runs from a moment later than
                    # this one, so counting from now is on the safe side.
                    record_behind([r.id for r in rows[index + 1 :]])
                    claimed_at = time.monotonic()
            if recording:
                recording.pop().result()
            self._record(results)
            self.queue.release([row.id for row in rows[untried:]], uncount=True)
        except BaseException:
            # Keep what we know: outcomes not recorded would mean mails sent twice, and rows
            # not tried would wait for their lease. The row on the wire keeps its lease.
            try:
                if recording:
                    recording.pop().result()
            except Exception as exc:
                log.warning("could not record a group after an error", error=describe(exc))
            try:
                self._record(results)
                self.queue.release([row.id for row in rows[untried:]], uncount=True)
            except Exception as exc:
                log.warning("could not record the batch after an error", error=describe(exc))
            raise
        return stop

    def _compose(self, row: Any) -> bytes | Path:
        """The row's mail in MIME form, or a spool file holding it (a mail carrying a large
        file): composed from its draft now, outside any transaction."""
        while self._ahead is not None and self._ahead_ids and row.draft is not None:
            # Answers come in claim order; those of rows never sent (withheld) are dropped.
            row_id = self._ahead_ids.popleft()
            answer = self._ahead.next()
            if answer is None:
                self._ahead_ids.clear()  # The child is gone: compose here.
            elif row_id != row.id:
                drop(answer)
            elif isinstance(answer, str):
                raise PermanentFailure(f"the mail cannot be composed: {answer}")
            elif isinstance(answer, TemporaryFailure):
                raise answer
            else:
                return answer
        try:
            return outgoing_mail(row.raw, row.draft, self.settings.desk.state_dir)
        except (ValueError, TypeError) as exc:
            # A draft that cannot be composed never will be: no retry can help it.
            raise PermanentFailure(f"the mail cannot be composed: {exc}") from None
        except OSError as exc:  # The spool could not be written (a full disk): for later.
            raise TemporaryFailure(f"the mail cannot be composed now: {describe(exc)}") from None

    def _deliver(
        self, transport: SmtpTransport | MaildirTransport, row: Any
    ) -> tuple[str, dict[str, Any], str | None, bool]:
        """Send one claimed row: its outcome, the values to record, the reason if it was given
        up on, and whether to stop the batch.
        """
        fields = {"outbox_id": row.id, "message_id": row.message_id, "kind": row.kind,
                  "attempt": row.attempts}  # fmt: skip
        try:
            recipients = _recipients(row.recipients)
            fields["recipients"] = len(recipients)
            if row.id in self._withheld:
                # Decided when it was queued, undone since: the company dropped after-hours
                # support, or the agent moved to the US. The rule holds for queued mail too.
                raise PermanentFailure("withheld: a US agent on a company without after-hours "
                                       "support")
            # Claims that ended without an outcome; the first may have been a neighbour's.
            crashes = row.attempts - 1 - row.deferrals
            if crashes > CRASHES_BEFORE_FAILED:
                raise PermanentFailure(f"the sender stopped {crashes} times while sending it")
            composed = self._compose(row)
            try:
                refused = transport.send(row.mail_from, recipients, composed)
            finally:
                drop(composed)  # A spool file is only for this attempt.
        except PermanentFailure as exc:
            reason, stop = str(exc), False
        except TemporaryFailure as exc:
            stop = isinstance(exc, Unreachable)
            now = self._now()
            deadline = row.created_at + self.give_up_after
            if now < deadline:
                wait = backoff(row.deferrals + 1, first=self.retry_base, most=self.retry_most)
                retry_at = min(now + wait, deadline)
                log.warning("mail deferred", **fields, outcome="retry", error=str(exc),
                            retry_at=retry_at.isoformat())  # fmt: skip
                values = {"status": "pending", "next_attempt_at": retry_at,
                          "deferrals": row.deferrals + 1, "last_error": str(exc)[:1000]}
                return "retry", values, None, stop
            days = self.give_up_after.total_seconds() / 86400
            reason = f"gave up after {days:g} days: {exc}"[:1000]
        else:
            # Recipients refused one by one are lost for good; the others did get the mail.
            note = f"refused: {refusals(refused)}"[:1000] if refused else None
            log.info("mail sent", **fields, outcome="sent", refused=len(refused))
            return "sent", {"status": "sent", "sent_at": utcnow(), "last_error": note}, None, False
        log.error("mail failed", **fields, outcome="failed", error=reason)
        return "failed", {"status": "failed", "last_error": reason[:1000]}, reason, stop

    def _seconds_to_next(self) -> float:
        """Seconds until the earliest due row (or lease end), at most `poll_seconds`."""
        with self.engine.connect() as conn:
            due_at = conn.execute(
                sa.select(sa.func.min(_ROW.next_attempt_at)).where(_ROW.status == "pending")
            ).scalar()
            lapses_at = conn.execute(
                sa.select(sa.func.min(_ROW.lease_until)).where(_ROW.status == "sending")
            ).scalar()
        times = [t for t in (due_at, lapses_at) if t is not None]
        if not times:
            return self.poll_seconds
        return max(0.0, min(self.poll_seconds, (min(times) - self._now()).total_seconds()))

    def _round(self, limit: int) -> float:
        """One batch, then how long to wait before the next."""
        report = self.send_batch(limit)
        if report.sent + report.retried + report.failed >= limit:
            return 0.0
        return self._seconds_to_next()

    async def run(
        self, stop: asyncio.Event, wake: asyncio.Event | None = None, limit: int = 1000
    ) -> None:
        """Send batches until `stop` is set; `wake` starts the next batch at once."""
        try:
            await self._run(stop, wake, limit)
        finally:
            self.close()

    def _recorder(self) -> ThreadPoolExecutor:
        if self._record_thread is None:
            self._record_thread = ThreadPoolExecutor(1, thread_name_prefix="send-record")
        return self._record_thread

    def close(self) -> None:
        """End the kept connection, the compose child and the recording thread, if any."""
        if self._kept is not None:
            self._kept[0].close()
            self._kept = None
        if self._ahead is not None:
            self._ahead.close()
        if self._record_thread is not None:
            self._record_thread.shutdown(wait=True)
            self._record_thread = None

    async def _run(self, stop: asyncio.Event, wake: asyncio.Event | None, limit: int) -> None:
        # The compose child starts with the first claim, not here: at start-up it would take
        # CPU from the parse child's start and the runner's first batch, and the claims made
        # before it is ready are composed by the sender itself.
        try:
            taken = await asyncio.to_thread(self.take_back)
        except Exception:
            log.exception("could not take back earlier claims")
        else:
            if taken:
                log.info("send.took_back", count=taken)
        while not stop.is_set():
            if wake is not None:
                # Cleared before the batch reads the outbox, so that a row committed while the
                # batch runs sets it again and is not left waiting for the next poll.
                wake.clear()
            try:
                delay = await asyncio.to_thread(self._round, limit)
            except Exception:
                # A database outage must not end the stage: log it and try again later.
                log.exception("send batch failed")
                delay = self.poll_seconds
            if self.handoff is not None:
                self.handoff.set_idle(True)
            try:
                await _wait_any([stop] if wake is None else [stop, wake], delay)
            finally:
                if self.handoff is not None:
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
