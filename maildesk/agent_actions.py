"""What an agent's mail does once the chain has decided: an answer relayed to the customer and
their colleagues who follow the ticket, commands applied and confirmed, an internal note copied
to the other agents, a refusal of commands, or a ticket opened from a forward.

Commands are all or nothing: they are applied in a savepoint, and the first one that the ticket
refuses (store/ticket_life.TicketActionError) rolls back every change of the mail, the answer
included, and the agent gets the reason with the list of valid commands. The command lines
never reach the customer: what is relayed is the block's body.
"""

from __future__ import annotations

import dataclasses
import json

from maildesk.filing import Filing, audience, finish, mark, persist
from maildesk.mail.message import Outcome
from maildesk.mail.quotes import scrub_reply_addresses
from maildesk.outbound.agent_mail import confirm_commands, refuse_commands
from maildesk.privacy.rights import is_restricted
from maildesk.rules import classify, route
from maildesk.rules.commands import Command
from maildesk.store import directory, ticket_life
from maildesk.store.models import Agent, AuditEvent, Message, Ticket
from maildesk.store.tickets import add_message, open_ticket

_STATUS_OF = {"close": "closed", "solved": "solved", "pending": "pending"}


def add_answer(f: Filing) -> Outcome:
    """ADD_ANSWER: the agent's answer goes to the requester and the colleagues who follow."""
    persist(f)
    _answer(f, _text(f))
    assert f.ticket is not None
    return finish(f, "answer", ticket=f.ticket)


def apply_commands(f: Filing) -> Outcome:
    """APPLY_COMMANDS and ADD_NOTE: apply the block, relay or note its body, confirm it."""
    session, agent, ticket, block = f.session, f.agent, f.ticket, f.block
    assert agent is not None and ticket is not None and block is not None
    persist(f)
    note = "note" in block.names()
    body = _text(f)
    savepoint = session.begin_nested()
    try:
        answered = False
        if note:
            message = mark(f, ticket_life.add_note(session, ticket=ticket, agent=agent, text=body,
                                                   actor=agent.email, mail=f.mail))
            message.inbound_mail_id = f.inbound.id
            _copy_note(f, message)
        elif body.strip():
            # The answer first: the status that the commands set is the one that stays.
            _answer(f, body)
            answered = True
        _apply(f, ticket, [c for c in block.commands if c.name != "note"])
    except ticket_life.TicketActionError as exc:
        savepoint.rollback()
        session.refresh(ticket)
        return _refuse(f, [str(exc)])
    savepoint.commit()
    confirm_commands(f.notifier, session, agent=agent, ticket=ticket,
                     lines=[c.line for c in block.commands], answered=answered)
    return finish(f, "answer" if answered else "commands", ticket=ticket, reason=f.reason)


def refuse(f: Filing) -> Outcome:
    """COMMAND_ERRORS: nothing changes; the agent gets the errors and the valid commands."""
    assert f.block is not None
    return _refuse(f, f.block.errors)


def forward_open(f: Filing) -> Outcome:
    """FORWARD_OPEN: a ticket for the original sender, acknowledged as if they had written."""
    session, mail, agent = f.session, f.mail, f.agent
    original, account, company = f.forwarded, f.forwarded_account, f.company
    assert mail is not None and agent is not None and original is not None
    assert account is not None and company is not None
    persist(f)
    # The original as its sender wrote it; the agent's forward around it is not theirs.
    as_written = dataclasses.replace(
        mail, from_address=original.address, from_name=original.name,
        subject=original.subject or mail.subject, text=original.text, html=None,
        in_reply_to=[], references=[],
    )
    savepoint = session.begin_nested()
    try:
        ticket = open_ticket(session, account=account, mail=as_written, now=f.now)
        message = add_message(
            session, state_dir=f.settings.desk.state_dir, ticket=ticket, mail=as_written,
            text=original.text, inbound_mail_id=f.inbound.id, matched_by=None, account=account,
            rule=f.rule,
        )
        session.add(AuditEvent(actor=agent.email, action="ticket.forward_open",
                               ticket_id=ticket.id, account_id=account.id,
                               detail=json.dumps({"via": original.via})))
        assert f.block is not None
        _apply(f, ticket, [c for c in f.block.commands if c.name != "new"])
    except ticket_life.TicketActionError as exc:
        savepoint.rollback()
        return _refuse(f, [str(exc)])
    savepoint.commit()
    if not classify.suppresses_auto_reply(mail) and f.notices.may_send(
        session, account.email, now=f.now, account_id=account.id
    ):
        f.notifier.acknowledge(session, ticket=ticket, account=account, message=message)
    if not is_restricted(account):
        f.notifier.tell_agents_new_ticket(
            session, ticket=ticket, account=account, company=company, message=message,
            agents=audience(f, ticket, company),
        )
    return finish(f, "ticket", ticket=ticket, reason=f.reason)


def _text(f: Filing) -> str:
    # The quoted history went with the block; any reply address of ours left in what remains
    # goes too: no address issued to an agent may reach the customer.
    assert f.block is not None
    return scrub_reply_addresses(f.block.body, f.settings.desk.address)


def _answer(f: Filing, text: str) -> Message:
    session, mail, agent, ticket, requester = f.session, f.mail, f.agent, f.ticket, f.account
    assert mail is not None and agent is not None and ticket is not None
    assert requester is not None
    message = add_message(
        session, state_dir=f.settings.desk.state_dir, ticket=ticket, mail=mail, text=text,
        inbound_mail_id=f.inbound.id, matched_by=route.BY_REPLY_ADDRESS, agent=agent, rule=f.rule,
    )
    # The requester first, then each colleague who follows the ticket and may still hear of it.
    readers = [requester, *(a for a in ticket_life.followers(session, ticket.id)
                            if directory.account_is_active(a, f.now))]
    for reader in readers:
        f.notifier.relay_answer(session, ticket=ticket, account=reader, agent=agent,
                                message=message)
    return message


def _copy_note(f: Filing, note: Message) -> None:
    agent, ticket, account, company = f.agent, f.ticket, f.account, f.company
    assert agent is not None and ticket is not None and account is not None
    assert company is not None
    others = [a for a in audience(f, ticket, company) if a.id != agent.id]
    if others and not is_restricted(account):
        f.notifier.tell_agents_followup(f.session, ticket=ticket, account=account,
                                        company=company, message=note, agents=others)


def _apply(f: Filing, ticket: Ticket, commands: list[Command]) -> None:
    """Apply each command to the ticket as the agent; TicketActionError when one is refused."""
    session, agent = f.session, f.agent
    assert agent is not None
    actor = agent.email
    for command in commands:
        name = command.name
        if name in _STATUS_OF:
            ticket_life.set_status(session, ticket=ticket, status=_STATUS_OF[name], actor=actor,
                                   now=f.now)
        elif name == "open":
            if ticket.status in ("solved", "closed"):
                ticket_life.reopen(session, ticket=ticket, actor=actor, now=f.now)
            else:
                ticket_life.set_status(session, ticket=ticket, status="open", actor=actor,
                                       now=f.now)
        elif name == "assign":
            ticket_life.assign(session, ticket=ticket, agent=_assignee(f, command), actor=actor)
        elif name == "priority":
            ticket_life.set_priority(session, ticket=ticket, priority=command.argument or "",
                                     actor=actor)
        elif name == "watch":
            ticket_life.watch(session, ticket=ticket, agent=agent, actor=actor)
        elif name == "merge":
            target = session.get(Ticket, int(command.argument or 0))
            if target is None:
                raise ticket_life.TicketActionError(f"no ticket #{command.argument}")
            ticket_life.merge(session, source=ticket, target=target, actor=actor, now=f.now)
        else:
            raise ticket_life.TicketActionError(f"{command.line} does not apply here")


def _assignee(f: Filing, command: Command) -> Agent:
    if command.argument == "me":
        assert f.agent is not None
        return f.agent
    found = directory.find_agent(f.session, command.argument or "")
    if found is None:
        raise ticket_life.TicketActionError(f"no agent {command.argument}")
    return found


def _refuse(f: Filing, errors: list[str]) -> Outcome:
    assert f.agent is not None
    refuse_commands(f.notifier, f.session, agent=f.agent, ticket=f.ticket, errors=errors)
    if f.ticket is not None:
        f.session.add(AuditEvent(actor=f.agent.email, action="agent.commands_refused",
                                 ticket_id=f.ticket.id,
                                 detail=json.dumps({"errors": errors}, ensure_ascii=False)))
    return finish(f, "quarantined", ticket=None,
                  reason=f"commands refused: {'; '.join(errors)}"[:1000])
