"""The send stage: deliver the outbox's due mails by SMTP or into a maildir.

A sender claims due rows a batch at a time: in one short transaction it picks the oldest due
rows, up to `claim_size` of them (`SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL, so that
concurrent senders pass over each other's rows instead of queueing behind them), then sets them
to "sending" with a lease, i.e. `next_attempt_at = now + lease`, and commits. Only then does it
talk to the server, one row after the other over one connection, and it records the outcomes a
group at a time (every RECORD_ROWS rows or RECORD_SECONDS, whichever comes first, and at the end
of the claim). A row whose lease has run out (its sender crashed) is due again. The claiming
UPDATE repeats the "is due" condition, so that a row claimed by someone else between our SELECT
and our UPDATE is left alone; on SQLite, which ignores FOR UPDATE and serialises writers with its
database lock, that condition alone keeps senders apart. Rows claimed but never tried (the server
is unreachable, or the claim has used half its lease) are given back as they were.

Few write transactions matter on SQLite: each one queues for the database's single write lock,
which the pipeline takes back to back during a burst of incoming mail, and a sender that took the
lock twice per mail sent only a few mails a second until the burst was over.

Delivery is therefore at least once, never at most once: a crash (or a lost database) between the
server's 250 and our commit sends the mail again once the lease expires, as does a connection
dropped after the server took the mail but before it answered. Since outcomes are recorded a group
at a time, a crash in the middle of a claim sends again the rows of the group not yet recorded
(at most RECORD_ROWS rows, or RECORD_SECONDS' worth of sending, plus the row on the wire), while
the claimed rows not yet tried stay "sending" until their lease passes and are then sent once.
The Message-ID is the same both times, so mail clients thread the copies together and most hide
the duplicate.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from maildesk.config import Settings
from maildesk.logs import get_logger
from maildesk.outbound.transport import (
    MaildirTransport,
    PermanentFailure,
    SmtpTransport,
    TemporaryFailure,
    Unreachable,
    describe,
    refusals,
)
from maildesk.store.models import Outbox, utcnow

log = get_logger("send")

LEASE = timedelta(minutes=10)
MAX_BACKOFF = timedelta(hours=1)
# Rows claimed in one transaction; a claim is sent over one connection.
CLAIM_SIZE = 50
# Outcomes are committed every RECORD_ROWS rows or RECORD_SECONDS, whichever comes first: this
# bounds both the write transactions per mail and the mails sent again after a crash.
RECORD_ROWS = 20
RECORD_SECONDS = 0.5
_OUTBOX: sa.Table = Outbox.metadata.tables["outbox"]
_ROW = _OUTBOX.c
_DUE_STATUSES = ("pending", "sending")


@dataclass(frozen=True)
class SendReport:
    """How many mails one batch sent, left for a retry, and gave up on."""

    sent: int = 0
    retried: int = 0
    failed: int = 0


def _recipients(text: str) -> list[str]:
    """The envelope recipients stored as a JSON list of addresses."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise PermanentFailure("recipients are not a non-empty JSON list of addresses")
    return value


@dataclass(frozen=True)
class _Claim:
    """A row this sender leased, and what to put back should it not try the row after all."""

    row: Any  # The claiming UPDATE's RETURNING row, attempts already counted.
    status: str  # The row's status, attempts and next attempt before the claim.
    attempts: int
    due_at: datetime
    lease_until: datetime


class OutboxSender:
    """Sends the outbox's due mails and records each outcome on its row."""

    def __init__(
        self,
        settings: Settings,
        engine: sa.Engine,
        *,
        retry_base: timedelta = timedelta(minutes=1),
        max_attempts: int = 10,
        lease: timedelta = LEASE,
        poll_seconds: float = 5.0,
        timeout: float = 60.0,
        claim_size: int = CLAIM_SIZE,
    ) -> None:
        """Prepare a sender; `retry_base` is the first backoff, doubled at each retry."""
        self.settings = settings
        self.engine = engine
        self.retry_base = retry_base
        self.max_attempts = max_attempts
        self.lease = lease
        self.poll_seconds = poll_seconds
        self.timeout = timeout
        self.claim_size = max(1, claim_size)
        self._ssl_context: ssl.SSLContext | None = None

    def _tls_context(self) -> ssl.SSLContext:
        """The context for "ssl" and "starttls", built once: loading the CAs takes ~50 ms."""
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _transport(self) -> SmtpTransport | MaildirTransport:
        if self.settings.smtp.transport == "maildir":
            return MaildirTransport(self.settings.outgoing_maildir)
        return SmtpTransport(self.settings, self.timeout, self._tls_context)

    def _due(self, now: datetime) -> sa.ColumnElement[bool]:
        return sa.and_(_ROW.status.in_(_DUE_STATUSES), _ROW.next_attempt_at <= now)

    def _claim(self, size: int, skip: list[int]) -> tuple[list[_Claim], bool]:
        """Lease up to `size` of the oldest due rows not in `skip`, in one transaction.

        Also says whether more rows may be due: False when fewer than `size` were found.
        """
        while True:
            now = utcnow()
            pick = (
                sa.select(_ROW.id, _ROW.status, _ROW.attempts, _ROW.next_attempt_at)
                .where(self._due(now))
                .order_by(_ROW.id)
                .limit(size)
            )
            if skip:
                pick = pick.where(_ROW.id.not_in(skip))
            with self.engine.begin() as conn:
                picked = {r.id: r for r in conn.execute(pick.with_for_update(skip_locked=True))}
                if not picked:
                    return [], False
                # Counting the attempt when claiming makes a mail that keeps crashing its
                # sender run out of attempts instead of being resent forever. Repeating the
                # "is due" condition is the compare-and-set that keeps two senders apart.
                claim = (
                    sa.update(_OUTBOX)
                    .where(_ROW.id.in_(list(picked)), self._due(now))
                    .values(status="sending", attempts=_ROW.attempts + 1,
                            next_attempt_at=now + self.lease)
                    .returning(_ROW.id, _ROW.kind, _ROW.message_id, _ROW.mail_from,
                               _ROW.recipients, _ROW.raw, _ROW.attempts)
                )  # fmt: skip
                rows = conn.execute(claim).all()
            if rows:
                # RETURNING follows no particular order: send the oldest first.
                claims = [
                    _Claim(row, picked[row.id].status, picked[row.id].attempts,
                           picked[row.id].next_attempt_at, now + self.lease)
                    for row in sorted(rows, key=lambda r: r.id)
                ]  # fmt: skip
                return claims, len(picked) == size
            # Another sender claimed every one of them between our SELECT and our UPDATE.

    def _record(self, results: list[tuple[int, dict[str, Any]]]) -> None:
        """Commit the outcomes gathered so far in one transaction, and forget them."""
        if results:
            with self.engine.begin() as conn:
                for row_id, values in results:
                    conn.execute(sa.update(_OUTBOX).where(_ROW.id == row_id).values(**values))
            results.clear()

    def _release(self, claims: list[_Claim]) -> None:
        """Put back rows claimed but not tried, as they were, unless our lease has passed."""
        if claims:
            with self.engine.begin() as conn:
                for c in claims:
                    conn.execute(
                        sa.update(_OUTBOX)
                        .where(_ROW.id == c.row.id, _ROW.status == "sending",
                               _ROW.next_attempt_at == c.lease_until)
                        .values(status=c.status, attempts=c.attempts, next_attempt_at=c.due_at)
                    )  # fmt: skip

    def _backoff(self, attempts: int) -> timedelta:
        return min(self.retry_base * 2 ** min(attempts - 1, 30), MAX_BACKOFF)

    def send_batch(self, limit: int = 100) -> SendReport:
        """Send up to `limit` due mails over one connection and record each outcome."""
        counts = {"sent": 0, "retry": 0, "failed": 0}
        # A row is tried once per batch, even when its retry is due at once.
        tried: list[int] = []
        transport = self._transport()
        try:
            while len(tried) < limit:
                size = min(self.claim_size, limit - len(tried))
                claims, more = self._claim(size, tried)
                tried.extend(c.row.id for c in claims)
                # When nothing else was due, rows that come later wake the next batch.
                if self._send_claims(transport, claims, counts) or not more:
                    break
        finally:
            transport.close()
        return SendReport(sent=counts["sent"], retried=counts["retry"], failed=counts["failed"])

    def _send_claims(
        self,
        transport: SmtpTransport | MaildirTransport,
        claims: list[_Claim],
        counts: dict[str, int],
    ) -> bool:
        """Send claimed rows and record their outcomes by groups; True means stop the batch.

        A crash here leaves the rows whose outcome was not yet committed "sending": they are
        sent (again, for those already sent) once their lease passes. Grouping bounds how many
        that can be; see the module's docstring.
        """
        results: list[tuple[int, dict[str, Any]]] = []
        claimed_at = grouped_at = time.monotonic()
        untried = 0  # Index of the first claim not yet handed to the transport.
        stop = False
        try:
            for index, claim in enumerate(claims):
                # The lease must outlast the send: a row started with less than half of it
                # left could be claimed and sent by another sender while we are still at it.
                if time.monotonic() - claimed_at > self.lease.total_seconds() / 2:
                    log.warning("claim outlived half its lease",
                                left=len(claims) - index)  # fmt: skip
                    break
                untried = index + 1
                outcome, values, stop = self._deliver(transport, claim.row)
                counts[outcome] += 1
                if not results:
                    grouped_at = time.monotonic()
                results.append((claim.row.id, values))
                if stop:
                    # The server is unreachable: the other rows wait for the next batch,
                    # rather than each spending an attempt (and a timeout) on it now.
                    break
                if len(results) >= RECORD_ROWS or time.monotonic() - grouped_at >= RECORD_SECONDS:
                    self._record(results)
            self._record(results)
            self._release(claims[untried:])
        except BaseException:
            # Keep what we know: outcomes not recorded would mean mails sent twice, and rows
            # not tried would wait for their lease. The row on the wire keeps its lease.
            try:
                self._record(results)
                self._release(claims[untried:])
            except Exception as exc:
                log.warning("could not record the batch after an error", error=describe(exc))
            raise
        return stop

    def _deliver(
        self, transport: SmtpTransport | MaildirTransport, row: Any
    ) -> tuple[str, dict[str, Any], bool]:
        """Send one claimed row: its outcome, the values to record, and whether to stop."""
        fields = {"outbox_id": row.id, "message_id": row.message_id, "kind": row.kind,
                  "attempts": row.attempts}  # fmt: skip
        try:
            recipients = _recipients(row.recipients)
            fields["recipients"] = len(recipients)
            if row.attempts > self.max_attempts:
                raise PermanentFailure(f"abandoned after {row.attempts - 1} attempts")
            refused = transport.send(row.mail_from, recipients, row.raw)
        except PermanentFailure as exc:
            reason, stop = str(exc), False
        except TemporaryFailure as exc:
            stop = isinstance(exc, Unreachable)
            if row.attempts < self.max_attempts:
                retry_at = utcnow() + self._backoff(row.attempts)
                log.warning("mail deferred", **fields, outcome="retry", error=str(exc),
                            retry_at=retry_at.isoformat())  # fmt: skip
                values = {"status": "pending", "next_attempt_at": retry_at,
                          "last_error": str(exc)}  # fmt: skip
                return "retry", values, stop
            reason = f"gave up after {row.attempts} attempts: {exc}"
        else:
            # Recipients refused one by one are lost for good; the others did get the mail.
            note = f"refused: {refusals(refused)}"[:1000] if refused else None
            log.info("mail sent", **fields, outcome="sent", refused=len(refused))
            return "sent", {"status": "sent", "sent_at": utcnow(), "last_error": note}, False
        log.error("mail failed", **fields, outcome="failed", error=reason)
        return "failed", {"status": "failed", "last_error": reason}, stop

    def _seconds_to_next(self) -> float:
        """Seconds until the earliest due row (or lease end), at most `poll_seconds`."""
        with self.engine.connect() as conn:
            next_at = conn.execute(
                sa.select(sa.func.min(_ROW.next_attempt_at)).where(_ROW.status.in_(_DUE_STATUSES))
            ).scalar()
        if next_at is None:
            return self.poll_seconds
        return max(0.0, min(self.poll_seconds, (next_at - utcnow()).total_seconds()))

    def _round(self, limit: int) -> float:
        """One batch, then how long to wait before the next."""
        report = self.send_batch(limit)
        if report.sent + report.retried + report.failed >= limit:
            return 0.0
        return self._seconds_to_next()

    async def run(
        self, stop: asyncio.Event, wake: asyncio.Event | None = None, limit: int = 100
    ) -> None:
        """Send batches until `stop` is set; `wake` starts the next batch at once."""
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
            await _wait_any([stop] if wake is None else [stop, wake], delay)


async def _wait_any(events: list[asyncio.Event], timeout: float) -> None:
    """Return when any of `events` is set or after `timeout` seconds."""
    tasks = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
