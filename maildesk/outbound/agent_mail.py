"""The short mails that answer an agent's commands: what was applied, or why nothing was.

Neither carries a reply address: a reply to them reaches the desk's plain address, which lets
nobody act on a ticket. They answer an agent who was authenticated and wrote through their own
signed address, so they are not behind the limits on automatic mail.
"""

from __future__ import annotations

from sqlmodel import Session

from maildesk.outbound.notify import Notifier
from maildesk.rules.commands import valid_commands_help
from maildesk.store.models import Agent, Outbox, Ticket


def confirm_commands(
    notifier: Notifier, session: Session, *, agent: Agent, ticket: Ticket, lines: list[str],
    answered: bool,
) -> Outbox:
    """Tell an agent, in one short mail, the commands applied and the ticket's state now."""
    assignee = session.get(Agent, ticket.assignee_id) if ticket.assignee_id else None
    return notifier.compose(
        session, "commands_done", to_name=agent.name, to_address=agent.email,
        locale=notifier.agent_locale(agent), ticket=ticket, agent=agent, lines=lines,
        assignee=assignee, answered=answered,
    )


def refuse_commands(
    notifier: Notifier, session: Session, *, agent: Agent, ticket: Ticket | None,
    errors: list[str],
) -> Outbox:
    """Tell an agent that their commands changed nothing, why, and which commands are valid."""
    locale = notifier.agent_locale(agent)
    return notifier.compose(
        session, "commands_refused", to_name=agent.name, to_address=agent.email, locale=locale,
        ticket=ticket, agent=agent, errors=errors, help=valid_commands_help(locale),
    )
