"""Hand work to this instance's idle worker already claimed, by the transaction that queued it.

A queue's worker finds work by claiming it (store/queue.py): a write transaction of its own,
some milliseconds after the one that queued the row, which whoever waits for the work pays
for (a customer waiting for an acknowledgement). When the worker of this instance is idle, the
transaction that queues a row can claim it in the worker's name instead, as the worker's own
claim would (its name, a lease on the database's clock, the attempt counted), and once that
transaction has committed the row is handed over in memory. The worker treats what it is
handed as its claim: every outcome is still written under "this worker holds the row", so a
hand-over that came too late finds the row gone to another worker, and a crash between the
commit and the hand-over leaves an ordinary claim that the restarted worker takes back.

Only while the worker is idle, and one hand-over at a time: under a backlog the worker claims
by itself, in batches, oldest first.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Generic, TypeVar

import sqlalchemy as sa

from maildesk.store.queue import Queue, database_time

T = TypeVar("T")


class Handoff(Generic[T]):
    """What the transactions that queued rows of `queue` claimed for this instance's worker."""

    def __init__(
        self, queue: Queue, owner: str, lease: timedelta, *,
        max_items: int | None = None, max_weight: int | None = None,
    ) -> None:  # fmt: skip
        """Claim rows of `queue` in the name of `owner` (the worker's) for `lease` (its lease);
        a hand-over holds at most what one claim of the worker would (`max_items` rows whose
        weights add up to at most `max_weight`, or a single row of any weight)."""
        self.queue = queue
        self.owner = owner
        self.lease = lease
        self.max_items = max_items
        self.max_weight = max_weight
        self._lock = threading.Lock()
        self._ready: list[T] = []
        self._idle = False

    def set_idle(self, idle: bool) -> None:
        """The worker says whether it is waiting for work (True) or at work (False)."""
        with self._lock:
            self._idle = idle

    def accepting(self, count: int = 1, weight: int = 0) -> bool:
        """Whether a transaction about to queue `count` rows weighing `weight` in all should
        claim them for the worker."""
        if self.max_items is not None and count > self.max_items:
            return False
        if self.max_weight is not None and weight > self.max_weight and count > 1:
            return False
        with self._lock:
            return self._idle and not self._ready

    def claim(self, row: Any, bind: sa.Engine | sa.Connection) -> None:
        """Claim a new ORM row for the worker, as its claim would; `bind`'s clock sets the lease."""
        row.claimed_by = self.owner
        row.lease_until = database_time(bind, self.lease)
        row.attempts = 1
        for key, value in self.queue.on_claim.items():
            setattr(row, key, value)

    def hand(self, items: Sequence[T]) -> None:
        """Hand over what a committed transaction claimed (the queuing side)."""
        if items:
            with self._lock:
                self._ready.extend(items)

    def take(self) -> list[T]:
        """What was handed over since the last call, oldest first (the worker's side)."""
        with self._lock:
            items, self._ready = self._ready, []
        return items
