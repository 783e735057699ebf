"""A ticket's life in the store: status, priority, assignee, watchers, notes, merges, followers.

Every change writes an audit event (who, what, from and to; never a message's text), and
`history` reads them back for `tickets show`. A refusal is a TicketActionError with a one-line
message that the CLI prints and a reply by mail can quote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from maildesk.mail.message import ParsedMail
from maildesk.rules.lifecycle import PRIORITIES, STATUSES
from maildesk.store import directory
from maildesk.store.models import (
    Account,
    Agent,
    AuditEvent,
    Company,
    Message,
    Ticket,
    TicketFollower,
    TicketWatcher,
    utcnow,
)

# The audit actions of a ticket's life, as `tickets show` and `audit list --action` name them.
STATUS = "ticket.status"
REOPEN = "ticket.reopen"
ASSIGN = "ticket.assign"
PRIORITY = "ticket.priority"
WATCH = "ticket.watch"
NOTE = "ticket.note"
MERGE = "ticket.merge"
FOLLOW = "ticket.follow"


class TicketActionError(ValueError):
    """A change that the ticket refuses; the message, one line, says why."""


@dataclass(frozen=True)
class HistoryEntry:
    """One audit event of a ticket: who did what, when, with its from/to details."""

    at: datetime
    actor: str
    action: str
    detail: dict[str, Any]


def _audit(session: Session, *, ticket: Ticket, actor: str, action: str, **detail: Any) -> None:
    session.add(AuditEvent(
        actor=actor[:320], action=action, ticket_id=ticket.id, account_id=ticket.account_id,
        detail=json.dumps(detail, ensure_ascii=False, default=str),
    ))  # fmt: skip


def _company(session: Session, ticket: Ticket) -> Company:
    company = session.get(Company, ticket.company_id)
    if company is None:
        raise TicketActionError(f"ticket #{ticket.id} has no company")
    return company


def may_see(agent: Agent, company: Company) -> bool:
    """Whether an agent may see a company's tickets: US staff only under after-hours support."""
    return agent.region.lower() != "us" or company.after_hours


def check_agent(session: Session, *, ticket: Ticket, agent: Agent) -> None:
    """Refuse an agent who is inactive or may not see the ticket's company (the privacy rule)."""
    if not agent.active:
        raise TicketActionError(f"agent {agent.email} is inactive")
    if not may_see(agent, _company(session, ticket)):
        raise TicketActionError(
            f"agent {agent.email} is in the US team and the company of ticket #{ticket.id} "
            "has no after-hours support"
        )


def _live(ticket: Ticket) -> None:
    if ticket.merged_into_id is not None:
        raise TicketActionError(
            f"ticket #{ticket.id} was merged into #{ticket.merged_into_id}; act on that one"
        )


def _touch(session: Session, ticket: Ticket, now: datetime) -> None:
    ticket.updated_at = now
    session.add(ticket)
    session.flush()


def set_status(
    session: Session, *, ticket: Ticket, status: str, actor: str, now: datetime | None = None,
    reason: str | None = None,
) -> None:
    """Move a ticket to open, pending, solved or closed; the clock counts from `now`."""
    if status not in STATUSES:
        raise TicketActionError(f'status must be one of {", ".join(STATUSES)}, not "{status}"')
    _live(ticket)
    if ticket.status == status:
        raise TicketActionError(f"ticket #{ticket.id} is already {status}")
    _change_status(session, ticket=ticket, status=status, actor=actor, now=now or utcnow(),
                   action=STATUS, reason=reason)


def reopen(session: Session, *, ticket: Ticket, actor: str, now: datetime | None = None) -> None:
    """Open a solved or closed ticket again."""
    _live(ticket)
    if ticket.status not in ("solved", "closed"):
        raise TicketActionError(f"ticket #{ticket.id} is {ticket.status}, not solved or closed")
    _change_status(session, ticket=ticket, status="open", actor=actor, now=now or utcnow(),
                   action=REOPEN, reason=None)


def _change_status(
    session: Session, *, ticket: Ticket, status: str, actor: str, now: datetime, action: str,
    reason: str | None,
) -> None:
    detail: dict[str, Any] = {"from": ticket.status, "to": status}
    if reason:
        detail["reason"] = reason
    ticket.status = status
    ticket.status_changed_at = now
    _audit(session, ticket=ticket, actor=actor, action=action, **detail)
    _touch(session, ticket, now)


def assign(session: Session, *, ticket: Ticket, agent: Agent | None, actor: str) -> None:
    """Give the ticket to one agent, or to nobody (`agent` None)."""
    _live(ticket)
    if agent is not None:
        check_agent(session, ticket=ticket, agent=agent)
    if ticket.assignee_id == (agent.id if agent else None):
        who = f"assigned to {agent.email}" if agent else "unassigned"
        raise TicketActionError(f"ticket #{ticket.id} is already {who}")
    before = session.get(Agent, ticket.assignee_id) if ticket.assignee_id is not None else None
    ticket.assignee_id = agent.id if agent else None
    _audit(session, ticket=ticket, actor=actor, action=ASSIGN,
           **{"from": before.email if before else None, "to": agent.email if agent else None})
    _touch(session, ticket, utcnow())


def set_priority(session: Session, *, ticket: Ticket, priority: str, actor: str) -> None:
    """Set the ticket's priority: low, normal, high or urgent."""
    if priority not in PRIORITIES:
        raise TicketActionError(
            f'priority must be one of {", ".join(PRIORITIES)}, not "{priority}"'
        )
    _live(ticket)
    if ticket.priority == priority:
        raise TicketActionError(f"ticket #{ticket.id} is already of {priority} priority")
    before, ticket.priority = ticket.priority, priority
    _audit(session, ticket=ticket, actor=actor, action=PRIORITY, **{"from": before, "to": priority})
    _touch(session, ticket, utcnow())


def watch(session: Session, *, ticket: Ticket, agent: Agent, actor: str) -> TicketWatcher:
    """Let an agent hear of the ticket's follow-ups, whoever it is assigned to."""
    _live(ticket)
    check_agent(session, ticket=ticket, agent=agent)
    if agent.id in {a.id for a in watchers(session, ticket.id)}:
        raise TicketActionError(f"{agent.email} already watches ticket #{ticket.id}")
    row = TicketWatcher(ticket_id=ticket.id, agent_id=agent.id)  # type: ignore[arg-type]
    session.add(row)
    _audit(session, ticket=ticket, actor=actor, action=WATCH, agent=agent.email)
    session.flush()
    return row


def add_note(
    session: Session, *, ticket: Ticket, agent: Agent, text: str, actor: str,
    mail: ParsedMail | None = None,
) -> Message:
    """File an agent's internal note on the ticket: for the agents, never for the customer.

    A note that came by mail keeps its Message-ID (so that replies to it thread) but not its
    attachments, which the caller files if it wants them.
    """
    _live(ticket)
    check_agent(session, ticket=ticket, agent=agent)
    if not text.strip():
        raise TicketActionError("the note is empty")
    note = Message(
        ticket_id=ticket.id,  # type: ignore[arg-type]
        direction="in", author_kind="agent", author_email=agent.email,
        author_name=agent.name[:200], agent_id=agent.id, text=text, internal=True,
        message_id=mail.message_id if mail else None,
        in_reply_to=mail.in_reply_to[0] if mail and mail.in_reply_to else None,
    )
    session.add(note)
    session.flush()
    _audit(session, ticket=ticket, actor=actor, action=NOTE, message=note.id)
    _touch(session, ticket, utcnow())
    return note


def merge(
    session: Session, *, source: Ticket, target: Ticket, actor: str,
    now: datetime | None = None,
) -> int:
    """Move `source`'s thread into `target` and close `source`; returns the messages moved.

    The attachments move with their messages. Watchers and followers of `source` follow
    `target` too, and so does its requester when `target` has another one, so that nobody who
    heard of the request stops hearing of it.
    """
    now = now or utcnow()
    if source.id == target.id:
        raise TicketActionError(f"cannot merge ticket #{source.id} into itself")
    _live(source)
    if target.merged_into_id is not None:
        raise TicketActionError(
            f"ticket #{target.id} was merged into #{target.merged_into_id}; merge into that one"
        )
    if source.company_id != target.company_id:
        raise TicketActionError(
            f"tickets #{source.id} and #{target.id} belong to different companies"
        )
    moved = len(session.exec(select(Message.id).where(Message.ticket_id == source.id)).all())
    # One statement moves the whole thread; messages already loaded are updated in place.
    session.execute(
        sa.update(Message).where(col(Message.ticket_id) == source.id).values(ticket_id=target.id)
    )
    for agent in watchers(session, source.id):
        if agent.id not in {a.id for a in watchers(session, target.id)}:
            session.add(TicketWatcher(ticket_id=target.id, agent_id=agent.id))  # type: ignore[arg-type]
    joining = [a.id for a in followers(session, source.id)]
    if source.account_id != target.account_id:
        joining.append(source.account_id)
    present = {a.id for a in followers(session, target.id)} | {target.account_id}
    for account_id in dict.fromkeys(joining):
        if account_id not in present:
            session.add(TicketFollower(ticket_id=target.id, account_id=account_id))  # type: ignore[arg-type]
    before = source.status
    source.status, source.status_changed_at = "closed", now
    source.merged_into_id = target.id
    _audit(session, ticket=source, actor=actor, action=MERGE,
           **{"from": source.id, "to": target.id, "status": before, "messages": moved})
    _audit(session, ticket=target, actor=actor, action=MERGE,
           **{"from": source.id, "to": target.id, "messages": moved})
    _touch(session, source, now)
    _touch(session, target, now)
    return moved


def follow(session: Session, *, ticket: Ticket, account: Account, actor: str) -> TicketFollower:
    """Let a colleague of the requester (an active account of the same company) follow it."""
    _live(ticket)
    company = _company(session, ticket)
    if account.company_id != ticket.company_id:
        raise TicketActionError(f"{account.email} is not of the company of ticket #{ticket.id}")
    if not directory.account_is_active(account, utcnow(), company):
        raise TicketActionError(f"account {account.email} is not active")
    if account.id == ticket.account_id:
        raise TicketActionError(f"{account.email} is the requester of ticket #{ticket.id}")
    if account.id in {a.id for a in followers(session, ticket.id)}:
        raise TicketActionError(f"{account.email} already follows ticket #{ticket.id}")
    row = TicketFollower(ticket_id=ticket.id, account_id=account.id)  # type: ignore[arg-type]
    session.add(row)
    _audit(session, ticket=ticket, actor=actor, action=FOLLOW, account=account.email)
    session.flush()
    return row


def watchers(session: Session, ticket_id: int | None) -> list[Agent]:
    """The agents who watch a ticket, by email."""
    query = (select(Agent).join(TicketWatcher, col(TicketWatcher.agent_id) == col(Agent.id))
             .where(TicketWatcher.ticket_id == ticket_id).order_by(col(Agent.email)))
    return list(session.exec(query))


def followers(session: Session, ticket_id: int | None) -> list[Account]:
    """The requester's colleagues who follow a ticket, by email."""
    query = (select(Account)
             .join(TicketFollower, col(TicketFollower.account_id) == col(Account.id))
             .where(TicketFollower.ticket_id == ticket_id).order_by(col(Account.email)))
    return list(session.exec(query))


def history(session: Session, ticket_id: int) -> list[HistoryEntry]:
    """The ticket's audit events in order, without the access log's reads and deliveries."""
    query = (select(AuditEvent).where(AuditEvent.ticket_id == ticket_id,
                                      ~col(AuditEvent.action).startswith("access."))
             .order_by(col(AuditEvent.at), col(AuditEvent.id)))
    entries = []
    for event in session.exec(query):
        try:
            detail = json.loads(event.detail) if event.detail else {}
        except ValueError:
            detail = {"unreadable": "detail"}
        entries.append(HistoryEntry(event.at, event.actor, event.action,
                                    detail if isinstance(detail, dict) else {"value": detail}))
    return entries


def describe(session: Session, ticket: Ticket) -> dict[str, Any]:
    """A ticket's life as plain values, for the CLI: priority, people, links and history.

    A ticket is unattended when no active agent may see it: none at all, or only US staff for
    a company without after-hours support; agents added later can still claim it.
    """
    assignee = session.get(Agent, ticket.assignee_id) if ticket.assignee_id is not None else None
    company = session.get(Company, ticket.company_id)
    eligible = directory.agents_for(session, company) if company is not None else []
    return {
        "priority": ticket.priority,
        "assignee": assignee.email if assignee else None,
        "watchers": [agent.email for agent in watchers(session, ticket.id)],
        "followers": [account.email for account in followers(session, ticket.id)],
        "status_changed_at": ticket.status_changed_at.isoformat()
        if ticket.status_changed_at else None,
        "merged_into": ticket.merged_into_id,
        "follows": ticket.follows_id,
        "unattended": not eligible,
        "history": [
            {"at": entry.at.isoformat(), "actor": entry.actor, "action": entry.action,
             "detail": entry.detail}
            for entry in (history(session, ticket.id) if ticket.id is not None else [])
        ],
    }
