"""The ticket clock: tickets that wait too long close themselves.

A pending ticket (waiting for the customer) with no answer for `[tickets] pending_close_days`
closes, and the customer gets a short notice saying so and how to reopen it, behind the limits
on automatic mail like every automatic mail. A solved ticket closes after `solved_close_days`
without a mail: the customer already heard that it was solved, in the agent's answer, and one
more mail about nothing new is the kind that people learn to ignore.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col, select

from maildesk.config import Settings
from maildesk.logs import get_logger
from maildesk.notices import Notices
from maildesk.outbound.notify import Notifier
from maildesk.rules.lifecycle import closing_due
from maildesk.signing import load_reply_keys
from maildesk.store import database, directory, ticket_life
from maildesk.store.models import Account, Company, Message, Ticket, utcnow

log = get_logger("lifecycle")

ACTOR = "maildesk"


def _answered_since(session: Session, ticket: Ticket) -> bool:
    # A customer's mail after the ticket went pending is an answer, whatever status the
    # pipeline left; the clock never closes a ticket under a reply that nobody has read.
    since = ticket.status_changed_at
    found = session.exec(
        select(Message.id).where(
            Message.ticket_id == ticket.id, Message.author_kind == "customer",
            col(Message.created_at) > since,
        ).limit(1)
    ).first()
    return found is not None


def close_due_tickets(
    session: Session, *, settings: Settings, notifier: Notifier, now: datetime
) -> list[int]:
    """Close the pending and solved tickets whose wait is over; returns their ids."""
    rules = settings.tickets
    soonest = now - timedelta(days=min(rules.pending_close_days, rules.solved_close_days))
    waiting = session.exec(
        select(Ticket).where(
            col(Ticket.status).in_(("pending", "solved")),
            col(Ticket.status_changed_at).is_not(None),
            col(Ticket.status_changed_at) <= soonest,
        ).order_by(col(Ticket.id))
        # Several instances may run the clock at once on PostgreSQL: each ticket is closed, and
        # its customer told, by one of them (SQLite has one writer and ignores the clause).
        .with_for_update(skip_locked=True)
    ).all()
    notices = Notices(settings, notifier)
    closed = []
    for ticket in waiting:
        due = closing_due(ticket.status, ticket.status_changed_at, now,
                          pending_close_days=rules.pending_close_days,
                          solved_close_days=rules.solved_close_days)
        if not due or ticket.id is None or _answered_since(session, ticket):
            continue
        was = ticket.status
        reason = "no_answer" if was == "pending" else "solved"
        days = rules.pending_close_days if was == "pending" else rules.solved_close_days
        ticket_life.set_status(session, ticket=ticket, status="closed", actor=ACTOR, now=now,
                               reason=f"{reason}: {days} days")
        closed.append(ticket.id)
        if was == "pending":
            _tell_customer(session, notices, notifier, ticket, now)
    if closed:
        log.info("tickets closed by the clock", tickets=len(closed))
    return closed


def _tell_customer(
    session: Session, notices: Notices, notifier: Notifier, ticket: Ticket, now: datetime
) -> None:
    account = session.get(Account, ticket.account_id)
    company = session.get(Company, ticket.company_id)
    # Nobody gone, and nobody whose processing is restricted, gets a mail about it.
    if (account is None or account.restricted_at is not None
            or not directory.account_is_active(account, now, company)):
        return
    if not notices.may_send(session, account.email, now=now, account_id=account.id):
        return
    try:
        notifier.tell_customer_closed(session, ticket=ticket, account=account, reason="no_answer")
    except ValueError:
        log.info("no closing notice to an unusable address", ticket=ticket.id)


def run_clock_once(
    settings: Settings, engine: sa.Engine, notifier: Notifier, now: datetime
) -> list[int]:
    """One pass of the clock in its own transaction: the closes and their notices together."""
    with database.session_scope(engine) as session:
        return close_due_tickets(session, settings=settings, notifier=notifier, now=now)


async def run_ticket_clock(
    settings: Settings, engine: sa.Engine, stop: asyncio.Event, *,
    clock: Callable[[], datetime] = utcnow, interval: float = 3600,
    notifier: Notifier | None = None,
) -> None:
    """Close due tickets now and then every `interval` seconds until `stop` is set.

    A failed pass (the store unavailable, say) is logged and the next one tries again. The
    daemon hands in the pipeline's notifier, whose reply addresses are signed with the key that
    every instance shares.
    """
    notifier = notifier or Notifier(settings, load_reply_keys(settings))
    while not stop.is_set():
        try:
            await asyncio.to_thread(run_clock_once, settings, engine, notifier, clock())
        except Exception as exc:
            log.exception("ticket clock failed", error=type(exc).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
