"""The access log: an audit event for every access to personal data.

Who read an account or a ticket from the CLI, and which agent received a ticket's content by
mail. Events name the reader, the ticket or account, and what was read; never a message body.
"""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import Session

from maildesk.store.models import Agent, AuditEvent, Ticket

# The actions of the access log; `maildesk audit list --action access` shows them all.
READ = "access.read"
DELIVERY = "access.delivery"


def _event(
    session: Session, *, actor: str, action: str, ticket_id: int | None,
    account_id: int | None, **detail: Any,
) -> AuditEvent:
    if account_id is None and ticket_id is not None:
        # A ticket's content is its requester's data: the event counts as an access to them
        # too, so that `audit list --account` and the export find it.
        ticket = session.get(Ticket, ticket_id)
        account_id = ticket.account_id if ticket is not None else None
    event = AuditEvent(
        actor=actor[:320], action=action, ticket_id=ticket_id, account_id=account_id,
        detail=json.dumps(detail, ensure_ascii=False),
    )
    session.add(event)  # Written with the caller's next flush: nothing here reads it back.
    return event


def record_read(
    session: Session, *, actor: str, ticket_id: int | None = None,
    account_id: int | None = None, what: str,
) -> AuditEvent:
    """Record that `actor` (an agent, else the OS user) read an account or a ticket."""
    return _event(session, actor=actor, action=READ, ticket_id=ticket_id,
                  account_id=account_id, what=what)


def record_delivery(
    session: Session, *, agent: Agent, ticket_id: int, kind: str
) -> AuditEvent:
    """Record that a mail of `kind` delivers a ticket's content to `agent`, with their region."""
    return _event(session, actor=agent.email, action=DELIVERY, ticket_id=ticket_id,
                  account_id=None, kind=kind, region=agent.region)


def operator(as_agent: str | None, os_actor: str | None) -> str:
    """The reader to record: the agent given with `--as`, else the OS user, else "cli"."""
    return (as_agent or "").strip().lower() or os_actor or "cli"
