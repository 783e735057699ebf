"""The facts that the rules decide over, looked up in the store for one mail.

The rules in `maildesk.rules` read no database: the pipeline asks this module what the store
knows of a mail's sender and of the tickets the mail names, and hands the answers over as plain
values.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlmodel import Session, col, func, select

from maildesk.rules.classify import DirectoryEntry
from maildesk.rules.limits import AutomaticCounts
from maildesk.rules.route import ThreadFacts, TicketFacts
from maildesk.store import directory
from maildesk.store.models import Company, Message, Outbox, Ticket


def directory_entry(
    session: Session, address: str, now: datetime, *, hold: list[object] | None = None
) -> DirectoryEntry:
    """What the directory holds for a From address at `now`.

    The rows read are appended to `hold`: the session's identity map keeps objects only while
    someone does, and a caller that will get the same rows again then needs no query for them.
    """
    hold = [] if hold is None else hold
    agent = directory.find_agent(session, address)
    hold.append(agent)
    if agent is not None and agent.active:
        return DirectoryEntry(agent_id=agent.id)
    account = directory.find_account(session, address)
    if account is None:
        return DirectoryEntry()
    company = session.get(Company, account.company_id)
    hold += [account, company]
    active = company is not None and directory.account_is_active(account, now, company)
    return DirectoryEntry(
        account_id=account.id, company_id=account.company_id, account_active=active
    )


def thread_facts(
    session: Session, ticket_ids: Iterable[int], message_ids: list[str]
) -> ThreadFacts:
    """The tickets named by these ids and Message-IDs, and whom each belongs to."""
    by_message_id: dict[str, int] = {}
    wanted = list(dict.fromkeys(message_ids))
    # Chunks keep the IN lists within every database's limits on parameters.
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        sent = session.exec(
            select(Outbox.message_id, Outbox.ticket_id).where(
                col(Outbox.message_id).in_(chunk), col(Outbox.ticket_id).is_not(None)
            )
        )
        received = session.exec(
            select(Message.message_id, Message.ticket_id).where(col(Message.message_id).in_(chunk))
        )
        # A received message counts before a sent one with the same id: it is the thread's own.
        for message_id, ticket_id in [*sent, *received]:
            if message_id is not None and ticket_id is not None:
                by_message_id[message_id] = ticket_id
    ids = sorted({*ticket_ids, *by_message_id.values()})
    tickets: dict[int, TicketFacts] = {}
    for start in range(0, len(ids), 500):
        rows = session.exec(
            select(Ticket.id, Ticket.account_id, Ticket.company_id, Ticket.reply_epoch).where(
                col(Ticket.id).in_(ids[start : start + 500])
            )
        )
        for ticket_id, account_id, company_id, epoch in rows:
            if ticket_id is not None:
                tickets[ticket_id] = TicketFacts(ticket_id, account_id, company_id, epoch)
    return ThreadFacts(tickets=tickets, by_message_id=by_message_id)


def automatic_counts(
    session: Session, *, key: str, account_id: int | None, now: datetime, breaker_minutes: int,
    to_stranger: bool = False,
) -> AutomaticCounts:
    """The counts that the limits on automatic mail decide over, for one recipient."""
    to_mailbox = session.exec(
        select(func.count()).select_from(Outbox).where(
            Outbox.mailbox_key == key, col(Outbox.automatic).is_(True),
            Outbox.created_at > now - timedelta(days=1),
        )
    ).one()
    tickets = 0
    if account_id is not None:
        tickets = session.exec(
            select(func.count()).select_from(Ticket).where(
                Ticket.account_id == account_id,
                Ticket.created_at > now - timedelta(minutes=breaker_minutes),
            )
        ).one()
    # The global cap on answers to strangers is counted only for an answer to a stranger.
    strangers = 0
    if to_stranger:
        strangers = session.exec(
            select(func.count()).select_from(Outbox).where(
                Outbox.kind == "unknown_sender", Outbox.created_at > now - timedelta(hours=1)
            )
        ).one()
    return AutomaticCounts(int(to_mailbox), int(tickets), int(strangers))
