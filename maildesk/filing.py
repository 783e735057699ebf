"""Filing one mail: the facts that the chain decides over, looked up in the store, and what the
actions share (the mail's ledger row, the rule on each message, who hears of a ticket).

`look_up` walks the same checks as the chain (rules/chain.py), in its order, and stops as soon
as a fact decides: a mail from the desk itself needs no directory look-up. Besides the plain
`MailFacts`, it leaves on the `Filing` the rows that the action will need (the agent, the
account, the ticket, the command block, the forwarded original), so that nothing is looked up
twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlmodel import Session

from maildesk.config import Settings
from maildesk.logs import get_logger
from maildesk.mail.bounce import Bounce, read_bounce
from maildesk.mail.forward import Forwarded, forwarded_original
from maildesk.mail.message import Delivery, MalformedMail, Outcome, ParsedMail
from maildesk.mail.quotes import strip_quoted_reply
from maildesk.notices import Notices
from maildesk.outbound.notify import Notifier
from maildesk.privacy.rights import is_restricted
from maildesk.rules import classify, route
from maildesk.rules.authentication import AuthVerdict, authenticate_from
from maildesk.rules.chain import FINISHED_STATUSES, Decision, MailFacts
from maildesk.rules.commands import CommandBlock, read_commands
from maildesk.rules.lifecycle import after_customer_reply
from maildesk.rules.office_hours import OfficeHours
from maildesk.signing import ReplyKeyring
from maildesk.store import directory, lookup, ticket_life
from maildesk.store.models import Account, Agent, Company, InboundMail, Message, Ticket, utcnow

log = get_logger("pipeline")

# How many merges are followed from a ticket to the one that holds its thread now.
MAX_MERGE_HOPS = 10
# The first line of an agent's forward that asks for a new ticket, in either language.
_NEW_LINES = frozenset({"#new", "#nouveau"})


@dataclass
class Filing:
    """One mail being filed: where it is written, and what was looked up for it."""

    session: Session
    inbound: InboundMail
    settings: Settings
    notifier: Notifier
    notices: Notices
    delivery: Delivery
    now: datetime
    released: bool = False
    raw: bytes = b""  # The mail as stored (only its header, for a mail over the limit).
    mail: ParsedMail | None = None
    recipients: list[str] = field(default_factory=list)
    bounce: Bounce | None = None
    verdict: AuthVerdict | None = None
    sender: classify.Sender | None = None
    agent: Agent | None = None
    # The sender's account for a customer's mail; the requester for an agent's.
    account: Account | None = None
    company: Company | None = None
    ticket: Ticket | None = None
    matched_by: str | None = None
    block: CommandBlock | None = None
    forwarded: Forwarded | None = None
    forwarded_account: Account | None = None
    decision: Decision | None = None
    # Rows read while looking up, held so that getting them again hits the session's cache.
    held: list[object] = field(default_factory=list)

    @property
    def rule(self) -> str | None:
        """The name of the chain's rule that decided the mail."""
        return self.decision.rule.name if self.decision else None

    @property
    def reason(self) -> str | None:
        """The reason that the deciding rule gives."""
        return self.decision.reason if self.decision else None


def look_up(
    f: Filing, parsed: ParsedMail | MalformedMail | None, *, oversize: bool, keys: ReplyKeyring
) -> MailFacts:
    """The facts of one mail, in the order of the chain; the rows found stay on `f`."""
    if oversize:
        return MailFacts(oversize=True)
    if isinstance(parsed, MalformedMail) or parsed is None:
        return MailFacts(malformed=parsed.reason if parsed is not None else "not parsed")
    mail = f.mail = parsed
    f.inbound.message_id = (mail.message_id or "")[:998] or None
    desk = f.settings.desk
    if mail.from_address.lower() == desk.address:
        return MailFacts(from_desk_itself=True)
    f.recipients = route.recipients_of(mail, f.delivery.recipients)
    f.bounce = read_bounce(mail)
    if f.bounce is not None:
        return MailFacts(bounce=True)
    if mail.from_problem is not None:
        return MailFacts(from_problem=mail.from_problem)
    session = f.session
    automatic = classify.automatic_reason(mail, f.delivery)
    sender = f.sender = classify.identify_sender(
        mail.from_address, lookup.directory_entry(session, mail.from_address, f.now, hold=f.held)
    )
    tokens = route.reply_tokens(f.recipients, desk.address)
    thread = lookup.thread_facts(
        session, [*(t.ticket_id for t in tokens), *route.subject_tags(mail)],
        route.thread_message_ids(mail),
    )
    verdict = f.verdict = authenticate_from(mail, f.settings.security.trusted_authserv_id)
    common = MailFacts(
        automatic=automatic, quiet=automatic in classify.QUIET_RULES,
        authenticated=verdict.authenticated if verdict else None,
        auth_reason=verdict.reason if verdict else None,
    )
    today = f.now.date()
    if sender.kind == "agent":
        return _agent_facts(f, common, route.signed_ticket(sender, tokens, thread, keys=keys,
                                                             today=today))
    if sender.kind != "account":
        kind = "deactivated" if sender.kind == "deactivated" else "unknown"
        return _with(common, sender_kind=kind)
    return _customer_facts(f, common, route.find_route(mail, sender, tokens, thread, keys=keys,
                                                       today=today))


def _with(facts: MailFacts, **changes: object) -> MailFacts:
    return MailFacts(**{**facts.__dict__, **changes})  # type: ignore[arg-type]


def live_ticket(session: Session, ticket: Ticket | None) -> Ticket | None:
    """The ticket that holds a thread now: a merged ticket's replies join its target."""
    for _ in range(MAX_MERGE_HOPS):
        if ticket is None or ticket.merged_into_id is None:
            break
        ticket = session.get(Ticket, ticket.merged_into_id)
    return ticket


def _agent_facts(f: Filing, common: MailFacts, ticket_id: int | None) -> MailFacts:
    session, mail = f.session, f.mail
    assert mail is not None and f.sender is not None
    f.agent = session.get(Agent, f.sender.agent_id)
    assert f.agent is not None
    us = f.agent.region.upper() == "US"
    block = f.block = read_commands(strip_quoted_reply(mail.text), sender="agent")
    first = next((line.strip() for line in mail.text.splitlines() if line.strip()), "")
    facts = _with(common, sender_kind="agent", has_commands=bool(block.commands),
                  command_errors=bool(block.errors), note="note" in block.names())
    if first.casefold() in _NEW_LINES:
        original = f.forwarded = forwarded_original(mail)
        account = directory.find_account(session, original.address) if original else None
        company = session.get(Company, account.company_id) if account else None
        active = bool(account and company and directory.account_is_active(account, f.now,
                                                                          company))
        if active:
            f.forwarded_account, f.company = account, company
        return _with(facts, is_forward_new=True, forwarded_sender_is_account=active,
                     agent_may_see_ticket=not (us and company is not None
                                               and not company.after_hours))
    ticket = f.ticket = live_ticket(session, session.get(Ticket, ticket_id) if ticket_id else None)
    if ticket is None:
        return facts
    f.company = session.get(Company, ticket.company_id)
    f.account = session.get(Account, ticket.account_id)
    restricted = f.account is not None and is_restricted(f.account)
    may_see = not us or (f.company is not None and f.company.after_hours and not restricted)
    return _with(facts, agent_signed_ticket=True, agent_may_see_ticket=may_see)


def _customer_facts(f: Filing, common: MailFacts, found: route.Route | None) -> MailFacts:
    session, mail, sender = f.session, f.mail, f.sender
    assert mail is not None and sender is not None
    f.account = session.get(Account, sender.account_id)
    f.company = session.get(Company, sender.company_id)
    facts = _with(common, sender_kind="account")
    ticket = f.ticket = live_ticket(session, session.get(Ticket, found.ticket_id)
                                    if found else None)
    if found is None or ticket is None:
        return facts
    f.matched_by = found.matched_by
    block = f.block = read_commands(strip_quoted_reply(mail.text), sender="customer")
    reopen = "add"
    if ticket.status in FINISHED_STATUSES:
        reopen = after_customer_reply(ticket.status, ticket.status_changed_at, f.now,
                                      f.settings.tickets.reopen_days)
    return _with(facts, route_found=True, ticket_status=ticket.status, reopen=reopen,
                 has_commands=bool(block.commands))


def audience(f: Filing, ticket: Ticket, company: Company) -> list[Agent]:
    """The agents who hear of a ticket's news: its assignee and watchers once it is assigned.

    Only agents who may see the company count (the US rule, directory.agents_for); a ticket
    whose assignee and watchers all left goes back to every eligible agent. With
    `[tickets] us_agents = "outside_office_hours"`, US agents hear only of the tickets that
    arrived while the EU desk was closed, unless they are its assignee or watch it. With nobody
    at all, the ticket is still filed, and the log says that nobody will hear of it.
    """
    session = f.session
    eligible = directory.agents_for(session, company)
    wanted: set[int | None] = set()
    if ticket.assignee_id is not None:
        wanted = {ticket.assignee_id, *(a.id for a in ticket_life.watchers(session, ticket.id))}
    rules = f.settings.tickets
    if rules.us_agents == "outside_office_hours" and _in_office_hours(f, ticket):
        eligible = [a for a in eligible if a.region.upper() != "US" or a.id in wanted]
    chosen = [agent for agent in eligible if agent.id in wanted] or eligible
    if not chosen:
        log.warning("ticket unattended", ticket=ticket.id)
    return chosen


def _in_office_hours(f: Filing, ticket: Ticket) -> bool:
    rules = f.settings.tickets
    hours = OfficeHours.of(rules.office_opens, rules.office_closes, rules.office_days,
                           f.settings.desk.timezone)
    return hours.is_open(ticket.created_at)


def persist(f: Filing) -> None:
    """Write the mail's ledger row, so that what follows can refer to its id."""
    f.session.add(f.inbound)
    f.session.flush()


def mark(f: Filing, message: Message) -> Message:
    """Record on a message the rule of the chain that decided its mail."""
    message.rule = f.rule
    f.session.add(message)
    f.session.flush()
    return message


def finish(
    f: Filing, outcome: str, *, ticket: Ticket | None = None, reason: str | None = None
) -> Outcome:
    """Write what became of the mail on its ledger row."""
    inbound = f.inbound
    inbound.outcome = outcome
    inbound.reason = reason
    inbound.ticket_id = ticket.id if ticket else None
    inbound.processed_at = utcnow()
    f.session.add(inbound)
    f.session.flush()
    return Outcome(inbound.id, outcome, inbound.ticket_id, reason)  # type: ignore[arg-type]
