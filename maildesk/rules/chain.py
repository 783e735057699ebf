"""The chain: one decision for one mail, as one ordered table of named rules.

In the spirit of GNU Mailman's chains (src/mailman/chains/builtin.py): each `Rule` is a name, a
sentence, a check over plain facts and the action it leads to. `decide` walks `CHAIN` from the
top and the first rule whose check holds decides; the last rule always holds. The rule's name is
what the message records, so that a reader can go from a mail in the ledger to the row of this
table, and from the row to the issue that asked for it.

The pipeline looks the facts up (`MailFacts`: booleans, names and reasons, no ORM objects) and
applies the action in one place. The order of the rows is the order of today's checks in
`Pipeline.file` and `Pipeline._agent_mail`: the size, the parse, the desk's own mail, bounces,
a doubtful From; then an agent's mail, a stranger's, a customer's.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

SenderKind = Literal["agent", "account", "deactivated", "unknown"]
Reopen = Literal["add", "reopen", "new"]

# The statuses that a customer's reply reopens (within [tickets] reopen_days).
FINISHED_STATUSES = frozenset({"solved", "closed"})


class Action(enum.StrEnum):
    """What the pipeline does with a mail once the chain has decided."""

    QUARANTINE = "quarantine"  # Hold it for a person, with the reason.
    KEEP_QUIET = "keep_quiet"  # Keep it, file nothing, answer nothing.
    RECORD_BOUNCE = "record_bounce"  # Match it to the mail that bounced; answer nobody.
    ANSWER_STRANGER = "answer_stranger"  # Quarantine it and tell the sender how to get help.
    REFUSE_AGENT = "refuse_agent"  # Quarantine it; tell the agent at their own address.
    OPEN_TICKET = "open_ticket"  # A new ticket for the sender, acknowledged.
    ADD_FOLLOWUP = "add_followup"  # The customer's mail joins their open or pending ticket.
    REOPEN_TICKET = "reopen_ticket"  # The customer's mail joins their finished ticket, reopened.
    # A new ticket that names the customer's old one, closed too long ago to reopen.
    OPEN_FOLLOW_UP_TICKET = "open_follow_up_ticket"
    ADD_ANSWER = "add_answer"  # The agent's answer goes to the customer.
    # The agent's reply stays internal and goes to the other agents on the ticket; the other
    # commands of its block are applied too.
    ADD_NOTE = "add_note"
    # Apply the commands and confirm them in one short mail; an agent's text below the block,
    # if any, goes to the customer as an answer.
    APPLY_COMMANDS = "apply_commands"
    COMMAND_ERRORS = "command_errors"  # Change nothing; reply with the valid commands.
    FORWARD_OPEN = "forward_open"  # Open a ticket for the original sender of a forward.
    REFUSE_FORWARD = "refuse_forward"  # Quarantine the forward; tell the agent why.


@dataclass(frozen=True)
class MailFacts:
    """The plain facts that the pipeline looked up for one mail: what the chain decides over.

    The defaults describe an active customer's new mail; a decision for anything else names
    what differs.
    """

    oversize: bool = False  # Only the header was taken: the mail is over the size limit.
    malformed: str | None = None  # Why the mail cannot be parsed.
    from_desk_itself: bool = False  # From is the desk's own address.
    bounce: bool = False  # A delivery status notification.
    from_problem: str | None = None  # Why the From cannot be trusted to name the sender.
    automatic: str | None = None  # The classify rule that says the mail is automatic.
    quiet: bool = False  # `automatic` is one of classify.QUIET_RULES.
    sender_kind: SenderKind = "account"
    # The trusted MTA's verdict on the From domain; None when no authserv-id is trusted.
    authenticated: bool | None = None
    auth_reason: str | None = None  # The verdict's evidence, or what it lacked.
    agent_signed_ticket: bool = False  # A reply address signed for this agent and the ticket.
    # The US rule: a US agent sees only the companies with after-hours support. For a forward,
    # the company is the original sender's.
    agent_may_see_ticket: bool = True
    has_commands: bool = False  # commands.read_commands found valid commands.
    command_errors: bool = False  # … or refused the block, with errors.
    note: bool = False  # The commands include #note.
    is_forward_new: bool = False  # An agent's mail with #new on its first line.
    # forward.forwarded_original found the original sender, an active account of an active
    # company.
    forwarded_sender_is_account: bool = False
    route_found: bool = False  # A customer's mail matched to a ticket of theirs.
    ticket_status: str | None = None  # The matched ticket's status.
    # Against [tickets] reopen_days: "reopen" within them, "new" after; "add" when the ticket
    # is not finished; None without a ticket.
    reopen: Reopen | None = None

    @property
    def stranger(self) -> str:
        """How a sender who is not an active account is described in the reason."""
        return "account deactivated" if self.sender_kind == "deactivated" else "unknown sender"


@dataclass(frozen=True)
class Rule:
    """A named check over the facts of a mail, and the action it leads to when it holds."""

    name: str
    description: str
    check: Callable[[MailFacts], bool]
    action: Action
    # The reason that the mail records, with {field} of MailFacts filled in; "" for the
    # description.
    reason: str = ""


@dataclass(frozen=True)
class Decision:
    """The action for a mail, the rule that chose it, and the reason to record."""

    action: Action
    rule: Rule
    reason: str


def _agent(f: MailFacts) -> bool:
    return f.sender_kind == "agent"


def _stranger(f: MailFacts) -> bool:
    return f.sender_kind in ("unknown", "deactivated")


def _customer(f: MailFacts) -> bool:
    return f.sender_kind == "account"


def _forward(f: MailFacts) -> bool:
    return _agent(f) and f.is_forward_new


def _finished_ticket(f: MailFacts) -> bool:
    return _customer(f) and f.route_found and f.ticket_status in FINISHED_STATUSES


A = Action
CHAIN: tuple[Rule, ...] = (
    # Every mail: what it is before who sent it.
    Rule("oversize", "over the size limit: only its header was taken", lambda f: f.oversize,
         A.QUARANTINE, "too large"),
    Rule("malformed", "the mail cannot be parsed", lambda f: f.malformed is not None,
         A.QUARANTINE, "malformed: {malformed}"),
    Rule("desk-itself", "sent by the desk's own address", lambda f: f.from_desk_itself,
         A.KEEP_QUIET, "sent by the desk itself"),
    Rule("bounce", "a delivery status notification: answered by nobody, matched or not",
         lambda f: f.bounce, A.RECORD_BOUNCE, "bounce"),
    Rule("ambiguous-sender", "a From naming two people, or hiding one address behind another",
         lambda f: f.from_problem is not None, A.QUARANTINE, "ambiguous sender: {from_problem}"),
    # An agent acts only when authenticated, and only through a reply address signed for them.
    Rule("agent-automatic", "an agent's automatic mail (an out-of-office, say)",
         lambda f: _agent(f) and f.automatic is not None, A.KEEP_QUIET,
         "automatic: {automatic}"),
    Rule("agent-unauthenticated", "an agent's mail that the trusted MTA does not vouch for",
         lambda f: _agent(f) and f.authenticated is False, A.REFUSE_AGENT,
         "agent mail not authenticated: {auth_reason}"),
    Rule("forward-command-errors", "a forward with #new whose commands are refused",
         lambda f: _forward(f) and f.command_errors, A.COMMAND_ERRORS,
         "commands refused"),
    # A forward has no signed reply address to prove its sender: only the MTA's verdict does.
    Rule("forward-unauthenticated", "a forward with #new where no trusted MTA vouches for it",
         lambda f: _forward(f) and f.authenticated is not True, A.REFUSE_AGENT,
         "a forward to open needs an authenticated agent"),
    Rule("forward-us-restricted", "a US agent's forward for a company without after-hours",
         lambda f: _forward(f) and not f.agent_may_see_ticket, A.REFUSE_FORWARD,
         "US agent on a company without after-hours support"),
    Rule("forward-new", "an agent forwards an active account's mail with #new",
         lambda f: _forward(f) and f.forwarded_sender_is_account, A.FORWARD_OPEN,
         "forwarded to open"),
    Rule("forward-refused", "a forward with #new whose original sender is no active account",
         _forward, A.REFUSE_FORWARD, "the forwarded sender is not an active account"),
    Rule("agent-unsigned", "an agent's mail not sent to a reply address signed for them",
         lambda f: _agent(f) and not f.agent_signed_ticket, A.REFUSE_AGENT,
         "agent mail without a signed reply address"),
    Rule("agent-us-restricted", "a US agent on a company without after-hours support",
         lambda f: _agent(f) and not f.agent_may_see_ticket, A.REFUSE_AGENT,
         "US agent on a company without after-hours support"),
    Rule("agent-command-errors", "an unknown or malformed command: nothing is applied",
         lambda f: _agent(f) and f.command_errors, A.COMMAND_ERRORS, "commands refused"),
    Rule("agent-note", "#note: the reply stays internal, for the other agents",
         lambda f: _agent(f) and f.note, A.ADD_NOTE, "internal note"),
    Rule("agent-commands", "an agent's commands, applied and confirmed",
         lambda f: _agent(f) and f.has_commands, A.APPLY_COMMANDS, "commands"),
    Rule("agent-answer", "an agent's answer, relayed to the customer", _agent, A.ADD_ANSWER,
         "answer"),
    # A stranger is answered only when a person wrote and, where the MTA is trusted, it vouches
    # for them: an answer to a forged sender would be backscatter.
    Rule("stranger-automatic", "a machine's mail from a stranger: held, never answered",
         lambda f: _stranger(f) and f.automatic is not None, A.QUARANTINE, "{stranger}"),
    Rule("stranger-unauthenticated", "a stranger the trusted MTA does not vouch for",
         lambda f: _stranger(f) and f.authenticated is False, A.QUARANTINE, "{stranger}"),
    Rule("stranger", "a person without an active account: held, and told how to get help",
         _stranger, A.ANSWER_STRANGER, "{stranger}"),
    # An active customer.
    Rule("automatic-reply", "an out-of-office or our own mail back: kept, filed nowhere",
         lambda f: _customer(f) and f.automatic is not None and f.quiet, A.KEEP_QUIET,
         "automatic: {automatic}"),
    Rule("automatic-sender", "a machine's mail (a list, a no-reply sender): held for the agents",
         lambda f: _customer(f) and f.automatic is not None, A.QUARANTINE,
         "automatic sender: {automatic}"),
    Rule("customer-unauthenticated", "a customer's mail that the trusted MTA does not vouch for",
         lambda f: _customer(f) and f.authenticated is False, A.QUARANTINE, "{auth_reason}"),
    Rule("customer-close", "#close or #fermer on the first line of a reply to their ticket",
         lambda f: _customer(f) and f.route_found and f.has_commands, A.APPLY_COMMANDS,
         "closed by the customer"),
    Rule("customer-new-after-closed", "a reply to a ticket finished longer than reopen_days ago",
         lambda f: _finished_ticket(f) and f.reopen == "new", A.OPEN_FOLLOW_UP_TICKET,
         "follows a {ticket_status} ticket"),
    Rule("customer-reopen", "a reply to a solved or closed ticket, within reopen_days",
         _finished_ticket, A.REOPEN_TICKET, "reopens a {ticket_status} ticket"),
    Rule("customer-follow-up", "a reply to an open or pending ticket of theirs",
         lambda f: _customer(f) and f.route_found, A.ADD_FOLLOWUP, "follow-up"),
    Rule("customer-new-ticket", "an active customer's new mail", _customer, A.OPEN_TICKET,
         "new ticket"),
    # Every kind of sender has its rows above; a mail that reaches this one is held.
    Rule("no-rule", "no rule above decided", lambda f: True, A.QUARANTINE, "no rule decided"),
)


class _Fields(Mapping[str, object]):
    """The facts as a mapping for str.format_map, properties included; None reads as ""."""

    def __init__(self, facts: MailFacts) -> None:
        self.facts = facts

    def __getitem__(self, key: str) -> object:
        value = getattr(self.facts, key)
        return "" if value is None else value

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def decide(facts: MailFacts) -> Decision:
    """The first rule of CHAIN whose check holds for the facts, with its action and reason."""
    for rule in CHAIN:
        if rule.check(facts):
            reason = rule.reason.format_map(_Fields(facts)).strip() or rule.description
            return Decision(rule.action, rule, reason)
    raise AssertionError("the last rule of CHAIN always holds")
