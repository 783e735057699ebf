"""File tickets and the messages of their threads, with their attachments."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlmodel import Session

from maildesk.mail.message import ParsedMail
from maildesk.store.files import (
    ATTACHMENTS_DIR,
    content_path,
    move_once,
    sha256_hex,
    write_once,
)
from maildesk.store.models import Account, Agent, Attachment, AuditEvent, Message, Ticket, utcnow

MAX_SUBJECT = 998


def open_ticket(
    session: Session, *, account: Account, mail: ParsedMail, now: datetime | None = None
) -> Ticket:
    """A new ticket for `account`, titled after the mail's subject, opened `now`."""
    subject = " ".join(mail.subject.split())[:MAX_SUBJECT] or "(no subject)"
    opened = now or utcnow()
    ticket = Ticket(subject=subject, account_id=account.id, company_id=account.company_id,  # type: ignore[arg-type]
                    created_at=opened, updated_at=opened)
    session.add(ticket)
    session.flush()
    session.add(
        AuditEvent(actor=account.email, action="ticket.open", ticket_id=ticket.id,
                   account_id=account.id)
    )
    return ticket


def add_message(
    session: Session,
    *,
    state_dir: Path,
    ticket: Ticket,
    mail: ParsedMail,
    text: str,
    inbound_mail_id: int | None,
    matched_by: str | None,
    account: Account | None = None,
    agent: Agent | None = None,
    rule: str | None = None,
) -> Message:
    """File a received mail in a ticket's thread, with its attachments (and the chain's rule
    that decided it, written with the message rather than after it)."""
    author_kind = "agent" if agent is not None else "customer"
    message = Message(
        ticket_id=ticket.id,  # type: ignore[arg-type]
        # An agent's answer is what goes out to the customer; everything else came in.
        direction="out" if agent is not None else "in",
        author_kind=author_kind,
        author_email=mail.from_address,
        author_name=(agent.name if agent else account.name if account else mail.from_name)[:200],
        account_id=account.id if account else None,
        agent_id=agent.id if agent else None,
        message_id=mail.message_id,
        in_reply_to=mail.in_reply_to[0] if mail.in_reply_to else None,
        matched_by=matched_by,
        text=text,
        # An agent's HTML still holds the quoted history that the text lost; keeping it would
        # relay the customer's own words back to them, so only customers' HTML is kept.
        html=mail.html if agent is None else None,
        inbound_mail_id=inbound_mail_id,
        rule=rule,
    )
    session.add(message)
    session.flush()
    for part in mail.attachments:
        if part.spooled is not None:
            digest = part.spooled.sha256
            move_once(content_path(state_dir, ATTACHMENTS_DIR, digest), Path(part.spooled.path))
        else:
            digest = sha256_hex(part.data)
            write_once(content_path(state_dir, ATTACHMENTS_DIR, digest), part.data)
        session.add(
            Attachment(
                message_id=message.id,  # type: ignore[arg-type]
                sha256=digest,
                filename=part.filename,
                content_type=part.content_type[:255],
                size=part.size,
                inline=part.inline,
                content_id=part.content_id,
            )
        )
    # The status is ticket life's (store/ticket_life.py), changed by the pipeline's actions with
    # an audit event each: storing a message only says that the ticket moved.
    ticket.updated_at = utcnow()
    session.add(ticket)
    session.add(
        AuditEvent(
            actor=mail.from_address,
            action="ticket.answer" if agent is not None else "ticket.message",
            ticket_id=ticket.id,
            account_id=account.id if account else None,
        )
    )
    session.flush()
    return message


def revoke_reply_addresses(session: Session, *, ticket: Ticket, actor: str) -> int:
    """Make every reply address issued for the ticket so far worthless; returns the new epoch."""
    ticket.reply_epoch += 1
    session.add(ticket)
    session.add(AuditEvent(actor=actor, action="ticket.reply_addresses_revoked",
                           ticket_id=ticket.id))
    session.flush()
    return ticket.reply_epoch
