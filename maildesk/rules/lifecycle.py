"""The ticket's clock, as pure decisions: what a customer's reply does to a ticket, and when a
ticket that waits closes itself.

The store records when a ticket's status last changed; these rules read that moment and the
`[tickets]` settings and touch nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

STATUSES = ("open", "pending", "solved", "closed")
PRIORITIES = ("low", "normal", "high", "urgent")
# The statuses in which a ticket still waits for someone: a customer's reply joins the thread.
_LIVE = ("open", "pending")

ReplyEffect = Literal["add", "reopen", "new"]


def after_customer_reply(
    status: str, status_changed_at: datetime | None, now: datetime, reopen_days: int
) -> ReplyEffect:
    """What a customer's reply does: join the thread, reopen the ticket, or open a new one.

    A solved or closed ticket reopens up to and including exactly `reopen_days` after its
    status changed; later, the reply opens a new ticket that names the old one. A ticket with
    no recorded change (from before the clock existed) counts as changed just now.
    """
    if status in _LIVE:
        return "add"
    changed = status_changed_at or now
    return "reopen" if now - changed <= timedelta(days=reopen_days) else "new"


def closing_due(
    status: str, status_changed_at: datetime | None, now: datetime, *,
    pending_close_days: int, solved_close_days: int,
) -> bool:
    """Whether a pending or solved ticket has waited long enough to close itself.

    It closes once its wait has reached the number of days, to the second; a ticket with no
    recorded change of status never closes by itself, since nobody knows how long it waited.
    """
    if status_changed_at is None:
        return False
    if status == "pending":
        days = pending_close_days
    elif status == "solved":
        days = solved_close_days
    else:
        return False
    return now - status_changed_at >= timedelta(days=days)
