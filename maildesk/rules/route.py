"""Route: which existing ticket, if any, a mail belongs to, and by which signal.

Three signals, strongest first: the signed reply address the mail was sent to; a Message-ID in
In-Reply-To or References that maildesk sent or received for a ticket; the ticket tag `[#<ref>]`
in the subject. Only the first proves anything by itself; the other two count only for a sender
who belongs to the ticket (its requester or a colleague from the same company).

Routing decides over facts that the store looked up for the mail (`ThreadFacts`): it reads no
database itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date

from maildesk.mail.message import ParsedMail
from maildesk.rules.classify import Sender
from maildesk.signing import (
    ReplyKeyring,
    ReplyToken,
    principal_of_account,
    principal_of_agent,
    read_reply_address,
    verify_reply_token,
)

SUBJECT_TAG = re.compile(r"\[#(\d{1,12})\]")

BY_REPLY_ADDRESS = "reply_address"
BY_HEADERS = "in_reply_to"
BY_SUBJECT = "subject_tag"


@dataclass(frozen=True)
class TicketFacts:
    """Who a ticket belongs to."""

    id: int
    account_id: int
    company_id: int
    reply_epoch: int = 0


@dataclass(frozen=True)
class ThreadFacts:
    """The tickets that a mail names, as the store found them."""

    # Every existing ticket named by a reply address, a subject tag or a known Message-ID.
    tickets: Mapping[int, TicketFacts]
    # The ticket of each Message-ID in In-Reply-To and References that maildesk knows.
    by_message_id: Mapping[str, int]


@dataclass(frozen=True)
class Route:
    """The ticket a mail continues, and the signal that said so."""

    ticket_id: int
    matched_by: str


def recipients_of(mail: ParsedMail, envelope_recipients: tuple[str, ...]) -> list[str]:
    """Every address the mail was delivered or addressed to."""
    return [*envelope_recipients, *mail.delivered_to, *mail.to, *mail.cc]


def reply_tokens(recipients: list[str], desk_address: str) -> list[ReplyToken]:
    """The reply-address tokens among the recipients, unverified, without repeats."""
    found: dict[ReplyToken, None] = {}
    for address in recipients:
        token = read_reply_address(desk_address, address)
        if token is not None:
            found[token] = None
    return list(found)


def principal(sender: Sender) -> str | None:
    """Whom the sender's reply addresses are bound to: their agent or account, not an address."""
    if sender.agent_id is not None:
        return principal_of_agent(sender.agent_id)
    if sender.account_id is not None:
        return principal_of_account(sender.account_id)
    return None


def signed_ticket(
    sender: Sender, tokens: list[ReplyToken], facts: ThreadFacts, *, keys: ReplyKeyring,
    today: date,
) -> int | None:
    """The ticket named by a reply address signed for this sender, if the mail went to one."""
    bound_to = principal(sender)
    if bound_to is None:
        return None
    for token in tokens:
        ticket = facts.tickets.get(token.ticket_id)
        if ticket is not None and verify_reply_token(
            keys, token, principal=bound_to, epoch=ticket.reply_epoch, today=today
        ):
            return ticket.id
    return None


def subject_tags(mail: ParsedMail) -> list[int]:
    """The ticket numbers tagged `[#n]` in the subject, in order."""
    return [int(match.group(1)) for match in SUBJECT_TAG.finditer(mail.subject)]


def thread_message_ids(mail: ParsedMail) -> list[str]:
    """The Message-IDs that the mail answers, oldest first."""
    return [*mail.in_reply_to, *mail.references]


def _belongs(ticket: TicketFacts, sender: Sender) -> bool:
    return sender.account_id is not None and (
        sender.account_id == ticket.account_id or sender.company_id == ticket.company_id
    )


def find_route(
    mail: ParsedMail,
    sender: Sender,
    tokens: list[ReplyToken],
    facts: ThreadFacts,
    *,
    keys: ReplyKeyring,
    today: date,
) -> Route | None:
    """The ticket this mail continues, or None when it opens a new one."""
    ticket_id = signed_ticket(sender, tokens, facts, keys=keys, today=today)
    if ticket_id is not None:
        return Route(ticket_id, BY_REPLY_ADDRESS)
    # The newest mention wins: References lists the thread oldest first.
    for message_id in reversed(thread_message_ids(mail)):
        found = facts.by_message_id.get(message_id)
        if found is not None:
            ticket = facts.tickets.get(found)
            if ticket is not None and _belongs(ticket, sender):
                return Route(ticket.id, BY_HEADERS)
            break
    for tagged in subject_tags(mail):
        ticket = facts.tickets.get(tagged)
        if ticket is not None and _belongs(ticket, sender):
            return Route(ticket.id, BY_SUBJECT)
    return None
