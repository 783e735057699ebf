"""Group commit: the listener's mails that arrive while a commit is under way share the next.

Each commit costs an fsync, a few milliseconds on most disks, and on SQLite it queues for the
database's single write lock. A burst of mails from several connections would answer each 250
only after the commits of all the mails before it; stored together, they wait for one. A mail
that arrives when no commit is under way is stored at once: waiting for company would only
delay its 250, since those that come meanwhile join the next group anyway (PostgreSQL's own
group commit works the same way, its commit_delay off by default).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from maildesk import metrics
from maildesk.logs import get_logger
from maildesk.store.intake import Accepted, Arrival

log = get_logger("group_commit")

WINDOW_SECONDS = 0.0  # how long the first mail of a group waits for company
MAX_MAILS = 64
MAX_BYTES = 16 * 1024 * 1024

StoreBatch = Callable[[Sequence[Arrival]], list[Accepted]]


class GroupCommit:
    """Collects arrivals and stores them a group at a time, one writer at a time."""

    def __init__(
        self,
        store: StoreBatch,
        *,
        window: float = WINDOW_SECONDS,
        max_mails: int = MAX_MAILS,
        max_bytes: int = MAX_BYTES,
        on_commit: Callable[[], object] | None = None,
    ) -> None:
        """Store groups with `store` (blocking: it runs in a worker thread)."""
        self._store = store
        self._window = window
        self._max_mails = max_mails
        self._max_bytes = max_bytes
        self._on_commit: Callable[[], object] = on_commit or (lambda: None)
        self._waiting: list[tuple[Arrival, asyncio.Future[Accepted]]] = []
        self._bytes = 0
        self._full = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, arrival: Arrival) -> Accepted:
        """Store one mail with whatever arrives with it; returns once the commit is durable.

        Raises the store's error when the group could not be stored.
        """
        future: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self._waiting.append((arrival, future))
        self._bytes += len(arrival.raw)
        if len(self._waiting) >= self._max_mails or self._bytes >= self._max_bytes:
            self._full.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="group-commit")
        # shield(): a client that hangs up does not cancel the commit of the others' mails.
        return await asyncio.shield(future)

    async def _write(self) -> None:
        """Store groups until no mail waits."""
        while self._waiting:
            if self._window > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._window)
            cut = self._max_mails
            group, self._waiting = self._waiting[:cut], self._waiting[cut:]
            self._bytes = sum(len(arrival.raw) for arrival, _ in self._waiting)
            if len(self._waiting) < self._max_mails and self._bytes < self._max_bytes:
                self._full.clear()
            try:
                accepted = await asyncio.to_thread(self._store, [a for a, _ in group])
            except Exception as exc:
                log.warning("intake.store_failed", mails=len(group), error=repr(exc))
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (arrival, future), item in zip(group, accepted, strict=True):
                metrics.MAILS_STORED.labels(arrival.delivery.source).inc()
                if not future.done():
                    future.set_result(item)
            self._on_commit()

    async def drain(self) -> None:
        """Wait until every submitted mail has been stored (or refused)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._writer)
