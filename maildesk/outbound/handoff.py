"""Hand freshly queued mail to this instance's idle sender without a claim of its own.

The mail the sender is handed is queued deep inside a mail's filing (notify.py), so the filing
transaction says that it claims for the sender by a context variable rather than an argument:
within `SendHandoff.claiming()`, every Outbox row that notify queues is claimed for the sender
(store/handoff.py), and those that committed are handed over at the block's end, with what the
sender's own claim would have read of them: the sender reads nothing back.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from maildesk.store.handoff import Handoff
from maildesk.store.queue import Queue


@dataclass(frozen=True)
class HandedOutbox:
    """An Outbox row claimed for the sender: the columns its claim reads (send.OutboxSender
    ._claim), and when (on the hand-over's monotonic clock) it was claimed, which is no later
    than its lease began."""

    id: int
    attempts: int
    last_error: str | None
    kind: str
    message_id: str
    mail_from: str
    recipients: str
    raw: bytes
    draft: str | None
    deferrals: int
    created_at: datetime
    ticket_id: int | None
    claimed_at: float


class SendHandoff(Handoff[HandedOutbox]):
    """Outbox rows claimed for this instance's sender by the transaction that queued them;
    built on send.OUTBOX_QUEUE, the sender's owner name and its lease."""

    def __init__(
        self, queue: Queue, owner: str, lease: timedelta, *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        """As Handoff; `monotonic` dates each claim (a test moves it)."""
        super().__init__(queue, owner, lease)
        self.monotonic = monotonic

    @contextlib.contextmanager
    def claiming(self) -> Iterator[None]:
        """Within the block, mail queued in this thread is claimed for the sender; handed over
        at the block's end, once the caller's transaction, inside the block, has committed."""
        batch = _Batch(self)
        token = _CLAIMING.set(batch)
        try:
            yield
        finally:
            _CLAIMING.reset(token)
        # Reached only without an exception: a transaction that failed queued nothing.
        self.hand(batch.committed())


class _Batch:
    """The rows one transaction claimed for the sender, each with when it claimed it."""

    def __init__(self, handoff: SendHandoff) -> None:
        self.handoff = handoff
        self.rows: list[tuple[Any, float]] = []

    def committed(self) -> list[HandedOutbox]:
        # A row added in a savepoint that was rolled back (its mail failed) is transient again:
        # it has no identity, and nothing of it was written.
        kept = [
            _handed(row, claimed_at) for row, claimed_at in self.rows
            if sa.inspect(row).has_identity and row.id is not None
        ]  # fmt: skip
        return sorted(kept, key=lambda handed: handed.id)


def _handed(row: Any, claimed_at: float) -> HandedOutbox:
    # Read after the commit from the session's objects, which keep what they were given
    # (expire_on_commit=False); the lease, computed by the database, is not read.
    return HandedOutbox(
        id=row.id, attempts=row.attempts, last_error=row.last_error, kind=row.kind,
        message_id=row.message_id, mail_from=row.mail_from, recipients=row.recipients,
        raw=row.raw, draft=row.draft, deferrals=row.deferrals or 0, created_at=row.created_at,
        ticket_id=row.ticket_id, claimed_at=claimed_at,
    )  # fmt: skip


_CLAIMING: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar(
    "claiming_for_sender", default=None
)


def claim_for_sender(row: Any, bind: sa.Engine | sa.Connection) -> None:
    """Claim a new Outbox row for the sender, if the current transaction is claiming (see
    SendHandoff.claiming); `bind` is the session's engine, whose clock the lease is on."""
    batch = _CLAIMING.get()
    if batch is None:
        return
    # Dated before the database computes the lease, so that the sender's reckoning of the
    # lease left errs on the short side.
    claimed_at = batch.handoff.monotonic()
    batch.handoff.claim(row, bind)
    batch.rows.append((row, claimed_at))
