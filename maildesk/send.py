"""The send stage: deliver the outbox's due mails by SMTP or into a maildir.

A sender claims one due row at a time: in one short transaction it picks the oldest due row
(`SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL, so that concurrent senders pass over each
other's rows instead of queueing behind them), then sets it to "sending" with a lease, i.e.
`next_attempt_at = now + lease`, and commits. Only then does it talk to the server, and it
records the outcome in a second transaction. A row whose lease has run out (its sender crashed)
is due again. The claiming UPDATE repeats the "is due" condition, so that a row claimed by
someone else between our SELECT and our UPDATE is left alone; on SQLite, which ignores FOR UPDATE
and serialises writers with its database lock, that condition alone keeps senders apart.

Delivery is therefore at least once, never at most once: a crash (or a lost database) between the
server's 250 and our commit sends the mail again once the lease expires, as does a connection
dropped after the server took the mail but before it answered. The Message-ID is the same both
times, so mail clients thread the copies together and most hide the duplicate.
"""

from __future__ import annotations

import asyncio
import json
import mailbox
import smtplib
import ssl
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from maildesk.config import Settings
from maildesk.logs import get_logger
from maildesk.models import Outbox, utcnow

log = get_logger("send")

LEASE = timedelta(minutes=10)
MAX_BACKOFF = timedelta(hours=1)
_OUTBOX: sa.Table = Outbox.metadata.tables["outbox"]
_ROW = _OUTBOX.c
_DUE_STATUSES = ("pending", "sending")


@dataclass(frozen=True)
class SendReport:
    """How many mails one batch sent, left for a retry, and gave up on."""

    sent: int = 0
    retried: int = 0
    failed: int = 0


class _Temporary(Exception):
    """A failure that a later attempt may overcome; the message is a short reason."""


class _Permanent(Exception):
    """A failure that no retry can fix; the message is a short reason."""


class _Unreachable(_Temporary):
    """The server could not be reached or refused us before any mail was offered."""


def _reply(code: int, message: bytes | str) -> str:
    """A server reply as short text, never more than one line of it."""
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    return f"{code} {' '.join(text.split())}"[:300]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


class _SmtpTransport:
    """One SMTP connection, opened on first use and reused for the whole batch."""

    def __init__(self, settings: Settings, timeout: float) -> None:
        self._smtp = settings.smtp
        # EHLO with the desk's own domain: smtplib's default, socket.getfqdn(), can stall.
        self._helo = settings.desk.domain
        self._timeout = timeout
        self._client: smtplib.SMTP | None = None

    def _connect(self) -> smtplib.SMTP:
        cfg = self._smtp
        context = ssl.create_default_context()
        try:
            if cfg.tls == "ssl":
                client: smtplib.SMTP = smtplib.SMTP_SSL(
                    cfg.host, cfg.port, self._helo, timeout=self._timeout, context=context
                )
            else:
                client = smtplib.SMTP(cfg.host, cfg.port, self._helo, timeout=self._timeout)
            try:
                if cfg.tls == "starttls":
                    client.starttls(context=context)
                if cfg.username:
                    secret = cfg.password.get_secret_value() if cfg.password else ""
                    client.login(cfg.username, secret)
            except BaseException:
                client.close()
                raise
        # A refusal here (a bad login, say) is no fault of the mail, so it is never permanent.
        except smtplib.SMTPResponseException as exc:
            raise _Unreachable(f"connect: {_reply(exc.smtp_code, exc.smtp_error)}") from None
        except (smtplib.SMTPException, OSError) as exc:
            raise _Unreachable(f"connect to {cfg.host}:{cfg.port}: {_describe(exc)}") from None
        return client

    def send(self, mail_from: str, recipients: list[str], raw: bytes) -> dict[str, Any]:
        # smtplib closes its socket itself after some errors (a 421, a lost connection).
        if self._client is not None and self._client.sock is None:
            self._client = None
        if self._client is None:
            self._client = self._connect()
        try:
            return self._client.sendmail(mail_from, recipients, raw)
        except smtplib.SMTPRecipientsRefused as exc:
            reason = "all recipients refused: " + _refusals(exc.recipients)
            if all(code >= 500 for code, _ in exc.recipients.values()):
                raise _Permanent(reason) from None
            raise _Temporary(reason) from None
        except smtplib.SMTPResponseException as exc:
            reason = _reply(exc.smtp_code, exc.smtp_error)
            if 500 <= exc.smtp_code < 600:
                raise _Permanent(reason) from None
            raise _Temporary(reason) from None
        except (smtplib.SMTPException, OSError) as exc:
            self.close()
            raise _Temporary(f"connection lost: {_describe(exc)}") from None

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.quit()
            except (smtplib.SMTPException, OSError):
                self._client.close()
            self._client = None


class _MaildirTransport:
    """Mails dropped into a maildir, for a local MTA or a test to pick up."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._box: mailbox.Maildir | None = None

    def send(self, mail_from: str, recipients: list[str], raw: bytes) -> dict[str, Any]:
        try:
            if self._box is None:
                # Creating the subdirectories too accepts an empty directory made by hand.
                for sub in ("tmp", "new", "cur"):
                    (self._path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
                self._box = mailbox.Maildir(self._path, create=True)
            # Maildir writes into tmp/ and then renames into new/, so no reader ever sees a
            # half-written file; bytes are written as they are, line endings included.
            self._box.add(raw)
        except OSError as exc:
            raise _Temporary(f"maildir: {_describe(exc)}") from None
        return {}

    def close(self) -> None:
        self._box = None


def _recipients(text: str) -> list[str]:
    """The envelope recipients stored as a JSON list of addresses."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise _Permanent("recipients are not a non-empty JSON list of addresses")
    return value


def _refusals(refused: dict[str, Any]) -> str:
    return ", ".join(f"{addr} ({_reply(code, msg)})" for addr, (code, msg) in refused.items())


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
    ) -> None:
        """Prepare a sender; `retry_base` is the first backoff, doubled at each retry."""
        self.settings = settings
        self.engine = engine
        self.retry_base = retry_base
        self.max_attempts = max_attempts
        self.lease = lease
        self.poll_seconds = poll_seconds
        self.timeout = timeout

    def _transport(self) -> _SmtpTransport | _MaildirTransport:
        if self.settings.smtp.transport == "maildir":
            return _MaildirTransport(self.settings.outgoing_maildir)
        return _SmtpTransport(self.settings, self.timeout)

    def _due(self, now: datetime) -> sa.ColumnElement[bool]:
        return sa.and_(_ROW.status.in_(_DUE_STATUSES), _ROW.next_attempt_at <= now)

    def _claim(self, skip: list[int]) -> Any:
        """Lease the oldest due row not in `skip`, or return None when none is due."""
        while True:
            now = utcnow()
            pick = sa.select(_ROW.id).where(self._due(now)).order_by(_ROW.id).limit(1)
            if skip:
                pick = pick.where(_ROW.id.not_in(skip))
            with self.engine.begin() as conn:
                row_id = conn.execute(pick.with_for_update(skip_locked=True)).scalar()
                if row_id is None:
                    return None
                # Counting the attempt when claiming makes a mail that keeps crashing its
                # sender run out of attempts instead of being resent forever.
                claim = (
                    sa.update(_OUTBOX)
                    .where(_ROW.id == row_id, self._due(now))
                    .values(status="sending", attempts=_ROW.attempts + 1,
                            next_attempt_at=now + self.lease)
                    .returning(_ROW.id, _ROW.kind, _ROW.message_id, _ROW.mail_from,
                               _ROW.recipients, _ROW.raw, _ROW.attempts)
                )  # fmt: skip
                row = conn.execute(claim).one_or_none()
            if row is not None:
                return row
            # Another sender claimed the row between our SELECT and our UPDATE: look again.

    def _record(self, row_id: int, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.update(_OUTBOX).where(_ROW.id == row_id).values(**values))

    def _backoff(self, attempts: int) -> timedelta:
        return min(self.retry_base * 2 ** min(attempts - 1, 30), MAX_BACKOFF)

    def send_batch(self, limit: int = 100) -> SendReport:
        """Send up to `limit` due mails over one connection and record each outcome."""
        counts = {"sent": 0, "retry": 0, "failed": 0}
        tried: list[int] = []
        transport = self._transport()
        try:
            while len(tried) < limit:
                row = self._claim(tried)
                if row is None:
                    break
                # A row is tried once per batch, even when its retry is due at once.
                tried.append(row.id)
                outcome, stop = self._deliver(transport, row)
                counts[outcome] += 1
                if stop:
                    # The server is unreachable: the other rows wait for the next batch,
                    # rather than each spending an attempt (and a timeout) on it now.
                    break
        finally:
            transport.close()
        return SendReport(sent=counts["sent"], retried=counts["retry"], failed=counts["failed"])

    def _deliver(self, transport: _SmtpTransport | _MaildirTransport, row: Any) -> tuple[str, bool]:
        """Send one claimed row and record the outcome; True means stop the batch."""
        fields = {"outbox_id": row.id, "message_id": row.message_id, "kind": row.kind,
                  "attempts": row.attempts}  # fmt: skip
        try:
            recipients = _recipients(row.recipients)
            fields["recipients"] = len(recipients)
            if row.attempts > self.max_attempts:
                raise _Permanent(f"abandoned after {row.attempts - 1} attempts")
            refused = transport.send(row.mail_from, recipients, row.raw)
        except _Permanent as exc:
            reason, stop = str(exc), False
        except _Temporary as exc:
            stop = isinstance(exc, _Unreachable)
            if row.attempts < self.max_attempts:
                retry_at = utcnow() + self._backoff(row.attempts)
                self._record(row.id, status="pending", next_attempt_at=retry_at,
                             last_error=str(exc))  # fmt: skip
                log.warning("mail deferred", **fields, outcome="retry", error=str(exc),
                            retry_at=retry_at.isoformat())  # fmt: skip
                return "retry", stop
            reason = f"gave up after {row.attempts} attempts: {exc}"
        else:
            # Recipients refused one by one are lost for good; the others did get the mail.
            note = f"refused: {_refusals(refused)}"[:1000] if refused else None
            self._record(row.id, status="sent", sent_at=utcnow(), last_error=note)
            log.info("mail sent", **fields, outcome="sent", refused=len(refused))
            return "sent", False
        self._record(row.id, status="failed", last_error=reason)
        log.error("mail failed", **fields, outcome="failed", error=reason)
        return "failed", stop

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
