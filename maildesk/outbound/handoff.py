"""Hand freshly queued mail to this instance's idle sender without a claim of its own.

The mail the sender is handed is queued deep inside a mail's filing (notify.py), so the filing
transaction says that it claims for the sender by a context variable rather than an argument:
within `SendHandoff.claiming()`, every Outbox row that notify queues is claimed for the sender
(store/handoff.py), and the ids of those that committed are handed over at the block's end.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from maildesk.store.handoff import Handoff


class SendHandoff(Handoff[int]):
    """Outbox rows (their ids) claimed for this instance's sender by the transaction that
    queued them; built on send.OUTBOX_QUEUE, the sender's owner name and its lease."""

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
        self.hand(batch.committed_ids())


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
    batch.handoff.claim(row, bind)
    batch.rows.append(row)
