"""Route: which existing ticket, if any, a mail belongs to, and by which signal.

Three signals, strongest first: the signed reply address the mail was sent to; a Message-ID in
In-Reply-To or References that maildesk sent or received for a ticket; the ticket tag `[#<ref>]`
in the subject. Only the first proves anything by itself; the other two count only for a sender
who belongs to the ticket (its requester or a colleague from the same company).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlmodel import Session, col, select

from maildesk.classify import Sender
from maildesk.models import Message, Outbox, Ticket
from maildesk.parse import ParsedMail
from maildesk.signing import verify_reply_address

SUBJECT_TAG = re.compile(r"\[#(\d{1,12})\]")

BY_REPLY_ADDRESS = "reply_address"
BY_HEADERS = "in_reply_to"
BY_SUBJECT = "subject_tag"


@dataclass(frozen=True)
class Route:
    """The ticket a mail continues, and the signal that said so."""

    ticket: Ticket
    matched_by: str


def recipients_of(mail: ParsedMail, envelope_recipients: tuple[str, ...]) -> list[str]:
    """Every address the mail was delivered or addressed to."""
    return [*envelope_recipients, *mail.delivered_to, *mail.to, *mail.cc]


def signed_ticket(
    mail: ParsedMail, sender: str, recipients: list[str], *, key: bytes, desk_address: str
) -> int | None:
    """The ticket named by a reply address signed for `sender`, if the mail went to one."""
    for address in recipients:
        signed = verify_reply_address(key, desk_address, address, sender)
        if signed is not None:
            return signed.ticket_id
    return None


def _belongs(ticket: Ticket, sender: Sender) -> bool:
    account = sender.account
    return account is not None and (
        account.id == ticket.account_id or account.company_id == ticket.company_id
    )


def _ticket_by_message_ids(session: Session, ids: list[str]) -> Ticket | None:
    if not ids:
        return None
    # The newest mention wins: References lists the thread oldest first.
    for message_id in reversed(ids):
        found = session.exec(
            select(Message.ticket_id).where(Message.message_id == message_id).limit(1)
        ).first()
        if found is None:
            found = session.exec(
                select(Outbox.ticket_id)
                .where(Outbox.message_id == message_id, col(Outbox.ticket_id).is_not(None))
                .limit(1)
            ).first()
        if found is not None:
            return session.get(Ticket, found)
    return None


def find_route(
    session: Session,
    mail: ParsedMail,
    sender: Sender,
    recipients: list[str],
    *,
    key: bytes,
    desk_address: str,
) -> Route | None:
    """The ticket this mail continues, or None when it opens a new one."""
    ticket_id = signed_ticket(mail, sender.address, recipients, key=key, desk_address=desk_address)
    if ticket_id is not None:
        ticket = session.get(Ticket, ticket_id)
        if ticket is not None:
            return Route(ticket, BY_REPLY_ADDRESS)
    ticket = _ticket_by_message_ids(session, [*mail.in_reply_to, *mail.references])
    if ticket is not None and _belongs(ticket, sender):
        return Route(ticket, BY_HEADERS)
    for match in SUBJECT_TAG.finditer(mail.subject):
        ticket = session.get(Ticket, int(match.group(1)))
        if ticket is not None and _belongs(ticket, sender):
            return Route(ticket, BY_SUBJECT)
    return None
