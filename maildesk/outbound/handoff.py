"""Hand freshly queued mail to this instance's idle sender without a claim of its own.

Normally the sender finds queued mail by claiming it (store/queue.py): a write transaction of
its own, a few milliseconds after the one that queued the mail, which a customer waiting for
an acknowledgement pays for. When the sender is idle, the transaction that queues a mail can
claim it for the sender instead, as the sender's claim would (its name, a lease on the
database's clock, the attempt counted), and once that transaction has committed the new rows'
ids are handed over in memory. The sender reads them back under the same condition as any
claimed row, that it still holds them; a crash between the two leaves ordinary claims behind,
which the restarted sender takes back like any other.

Only when the sender is idle: under a backlog it claims by itself, in batches.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from maildesk.store.queue import database_time


class SendHandoff:
    """Rows claimed for this instance's sender by the transaction that queued them."""

    def __init__(self, owner: str, lease: timedelta) -> None:
        """Claim in the name of `owner` (the sender's) for `lease` (the sender's lease)."""
        self.owner = owner
        self.lease = lease
        self._lock = threading.Lock()
        self._ready: list[int] = []
        self._idle = False

    def set_idle(self, idle: bool) -> None:
        """The sender says whether it is waiting for mail (True) or at work (False)."""
        with self._lock:
            self._idle = idle

    def accepting(self) -> bool:
        """Whether a transaction about to queue mail should claim it for the sender."""
        with self._lock:
            return self._idle and not self._ready

    def take(self) -> list[int]:
        """The ids handed over since the last call, oldest first (the sender's side)."""
        with self._lock:
            ids, self._ready = self._ready, []
        return ids

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
        ids = batch.committed_ids()
        if ids:
            with self._lock:
                self._ready.extend(ids)


class _Batch:
    """The rows one transaction claimed for the sender."""

    def __init__(self, handoff: SendHandoff) -> None:
        self.handoff = handoff
        self.rows: list[Any] = []

    def committed_ids(self) -> list[int]:
        # A row added in a savepoint that was rolled back (its mail failed) is transient again:
        # it has no identity, and nothing of it was written.
        return sorted(
            row.id for row in self.rows if sa.inspect(row).has_identity and row.id is not None
        )


_CLAIMING: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar(
    "claiming_for_sender", default=None
)


def claim_for_sender(row: Any, bind: sa.Engine | sa.Connection) -> None:
    """Claim a new Outbox row for the sender, if the current transaction is claiming (see
    SendHandoff.claiming); `bind` is the session's engine, whose clock the lease is on."""
    batch = _CLAIMING.get()
    if batch is None:
        return
    handoff = batch.handoff
    row.status = "sending"
    row.claimed_by = handoff.owner
    row.attempts = 1
    row.lease_until = database_time(bind, handoff.lease)
    batch.rows.append(row)
