"""What a customer's mail does once the chain has decided: a new ticket, a follow-up, a reopened
ticket, a new one that follows an old one, or their own ticket closed.

Every mail filed on a ticket may bring colleagues in Cc: an active account of the same company
follows the ticket (store/ticket_life.follow); nobody else is ever added from To or Cc.
"""

from __future__ import annotations

from maildesk.filing import Filing, audience, finish, persist
from maildesk.mail.message import Outcome
from maildesk.mail.quotes import strip_quoted_reply
from maildesk.privacy.requests import check_mail as check_rights_request
from maildesk.privacy.rights import is_restricted
from maildesk.rules import classify
from maildesk.rules.chain import Action
from maildesk.store import directory, ticket_life
from maildesk.store.models import Message, Ticket
from maildesk.store.tickets import add_message, open_ticket


def open_new(f: Filing) -> Outcome:
    """OPEN_TICKET and OPEN_FOLLOW_UP_TICKET: a new ticket, acknowledged, told to the agents."""
    session, mail, account, company = f.session, f.mail, f.account, f.company
    assert mail is not None and account is not None and company is not None
    persist(f)
    old = f.ticket if f.decision and f.decision.action == Action.OPEN_FOLLOW_UP_TICKET else None
    ticket = open_ticket(session, account=account, mail=mail, now=f.now)
    if old is not None:
        ticket.follows_id = old.id
        session.add(ticket)
    message = add_message(
        session, state_dir=f.settings.desk.state_dir, ticket=ticket, mail=mail, text=mail.text,
        inbound_mail_id=f.inbound.id, matched_by=None, account=account, rule=f.rule,
    )
    add_colleagues(f, ticket)
    acknowledged = not classify.suppresses_auto_reply(mail) and f.notices.may_send(
        session, account.email, now=f.now, account_id=account.id
    )
    if acknowledged:
        f.notifier.acknowledge(session, ticket=ticket, account=account, message=message)
    _rights(f, ticket, message)
    if not is_restricted(account):
        f.notifier.tell_agents_new_ticket(
            session, ticket=ticket, account=account, company=company, message=message,
            agents=audience(f, ticket, company),
        )
    note = "released" if f.released else None if acknowledged else "not acknowledged"
    if old is not None:
        note = f"{f.reason} #{old.id}" + ("" if acknowledged else "; not acknowledged")
    return finish(f, "ticket", ticket=ticket, reason=note)


def add_followup(f: Filing) -> Outcome:
    """ADD_FOLLOWUP and REOPEN_TICKET: the mail joins the ticket, reopened if it was finished."""
    session, mail, account, ticket = f.session, f.mail, f.account, f.ticket
    assert mail is not None and account is not None and ticket is not None
    persist(f)
    reopening = f.decision is not None and f.decision.action == Action.REOPEN_TICKET
    if reopening:
        ticket_life.reopen(session, ticket=ticket, actor=account.email, now=f.now)
    elif ticket.status == "pending":
        # The ticket waited for the customer, who answered: it is the agents' turn again.
        ticket_life.set_status(session, ticket=ticket, status="open", actor=account.email,
                               now=f.now, reason="the customer answered")
    message = _file_reply(f, strip_quoted_reply(mail.text))
    _tell_agents(f, message)
    return finish(f, "followup", ticket=ticket, reason=f.reason if reopening else f.matched_by)


def close_by_customer(f: Filing) -> Outcome:
    """APPLY_COMMANDS for a customer: #close or #fermer closes their own ticket."""
    session, account, ticket, block = f.session, f.account, f.ticket, f.block
    assert account is not None and ticket is not None and block is not None
    persist(f)
    message = _file_reply(f, block.body)
    if ticket.status != "closed":
        ticket_life.set_status(session, ticket=ticket, status="closed", actor=account.email,
                               now=f.now, reason="closed by the customer")
    _tell_agents(f, message)
    return finish(f, "followup", ticket=ticket, reason=f.reason)


def add_colleagues(f: Filing, ticket: Ticket) -> list[str]:
    """Let the colleagues in Cc follow the ticket: active accounts of its company only."""
    assert f.mail is not None
    added = []
    for address in dict.fromkeys(a.lower() for a in f.mail.cc):
        colleague = directory.find_account(f.session, address)
        if colleague is None or colleague.company_id != ticket.company_id:
            continue
        if colleague.id == ticket.account_id:
            continue
        try:
            ticket_life.follow(f.session, ticket=ticket, account=colleague,
                               actor=f.mail.from_address)
        except ticket_life.TicketActionError:
            # Inactive, or following already: nothing to add.
            continue
        added.append(colleague.email)
    return added


def _file_reply(f: Filing, text: str) -> Message:
    session, mail, account, ticket = f.session, f.mail, f.account, f.ticket
    assert mail is not None and account is not None and ticket is not None
    message = add_message(
        session, state_dir=f.settings.desk.state_dir, ticket=ticket, mail=mail, text=text,
        inbound_mail_id=f.inbound.id, matched_by=f.matched_by, account=account, rule=f.rule,
    )
    add_colleagues(f, ticket)
    _rights(f, ticket, message)
    return message


def _rights(f: Filing, ticket: Ticket, message: Message) -> None:
    assert f.mail is not None and f.account is not None
    check_rights_request(f.session, ticket=ticket, account=f.account, message=message,
                         subject=f.mail.subject, received_at=f.inbound.received_at,
                         notifier=f.notifier)  # fmt: skip


def _tell_agents(f: Filing, message: Message) -> None:
    account, company, ticket = f.account, f.company, f.ticket
    assert account is not None and company is not None and ticket is not None
    # Under restriction, a person's data are kept but not processed: nobody is told.
    if is_restricted(account):
        return
    f.notifier.tell_agents_followup(
        f.session, ticket=ticket, account=account, company=company, message=message,
        agents=audience(f, ticket, company),
    )
