"""Commands that act on one ticket: its status, assignee, priority, notes, merges, watchers, and
`tickets revoke`.

Each takes `--as AGENT`, the agent in whose name it acts, recorded in the audit log; an agent
who may not see the ticket (US staff, for a company without after-hours support) is refused,
as by mail. Without `--as`, the OS user is recorded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from sqlmodel import Session

from maildesk.cli.errors import CommandError, NotFound
from maildesk.cli.output import terminal_safe
from maildesk.config import Settings
from maildesk.rules.lifecycle import PRIORITIES
from maildesk.store import database, directory, ticket_life
from maildesk.store.models import Agent, Ticket
from maildesk.store.ticket_life import TicketActionError
from maildesk.store.tickets import revoke_reply_addresses

# What each status command moves the ticket to.
_STATUS_COMMANDS = {"close": "closed", "pending": "pending", "solve": "solved"}

# A command's work: given the session, the ticket, the actor and the --as agent, it changes
# the ticket and returns the line to print.
Work = Callable[[Session, Ticket, str, Agent | None], str]


def cmd_tickets_revoke(args: argparse.Namespace, settings: Settings) -> int:
    """Make every reply address issued so far for a ticket worthless."""
    actor = args.as_agent or args.actor
    engine = database.make_engine(settings.store_url)
    try:
        database.check_schema(engine)
        with database.session_scope(engine) as session:
            ticket = session.get(Ticket, args.ref)
            if ticket is None:
                raise NotFound(f"no ticket #{args.ref}")
            epoch = revoke_reply_addresses(session, ticket=ticket, actor=actor)
    finally:
        engine.dispose()
    print(f"ticket #{args.ref}: every reply address issued so far is revoked "
          f"(reply epoch {epoch}); new mails carry new ones")
    return 0


def _agent(session: Session, email: str) -> Agent:
    agent = directory.find_agent(session, email)
    if agent is None:
        raise NotFound(f"no agent with email {email.strip()}")
    return agent


def _ticket(session: Session, ref: int) -> Ticket:
    ticket = session.get(Ticket, ref)
    if ticket is None:
        raise NotFound(f"no ticket #{ref}")
    return ticket


def _act(args: argparse.Namespace, settings: Settings, work: Work) -> int:
    """Run `work` on ticket REF in one transaction, as the --as agent; print its line."""
    engine = database.make_engine(settings.store_url)
    try:
        database.check_schema(engine)
        with database.session_scope(engine) as session:
            ticket = _ticket(session, args.ref)
            agent = None
            if args.as_agent:
                agent = _agent(session, args.as_agent)
            try:
                if agent is not None:
                    ticket_life.check_agent(session, ticket=ticket, agent=agent)
                line = work(session, ticket, agent.email if agent else args.actor, agent)
            except TicketActionError as exc:
                raise CommandError(str(exc)) from None
    finally:
        engine.dispose()
    print(terminal_safe(line))
    return 0


def cmd_tickets_status(args: argparse.Namespace, settings: Settings) -> int:
    """Close a ticket, mark it pending (waiting for the customer) or solved."""
    status = _STATUS_COMMANDS[args.status_command]

    def work(session: Session, ticket: Ticket, actor: str, agent: Agent | None) -> str:
        was = ticket.status
        ticket_life.set_status(session, ticket=ticket, status=status, actor=actor)
        return f"ticket #{ticket.id}: {status} (was {was})"

    return _act(args, settings, work)


def cmd_tickets_reopen(args: argparse.Namespace, settings: Settings) -> int:
    """Open a solved or closed ticket again."""

    def work(session: Session, ticket: Ticket, actor: str, agent: Agent | None) -> str:
        was = ticket.status
        ticket_life.reopen(session, ticket=ticket, actor=actor)
        return f"ticket #{ticket.id}: reopened (was {was})"

    return _act(args, settings, work)


def cmd_tickets_assign(args: argparse.Namespace, settings: Settings) -> int:
    """Give a ticket to one agent, or to nobody."""
    if (args.email is None) == (not args.none):
        raise CommandError("give an agent's email, me, or --none")

    def work(session: Session, ticket: Ticket, actor: str, agent: Agent | None) -> str:
        if args.none:
            ticket_life.assign(session, ticket=ticket, agent=None, actor=actor)
            return f"ticket #{ticket.id}: unassigned"
        if args.email.strip().lower() == "me":
            if agent is None:
                raise CommandError("assign REF me needs --as AGENT")
            assignee = agent
        else:
            assignee = _agent(session, args.email)
        ticket_life.assign(session, ticket=ticket, agent=assignee, actor=actor)
        return f"ticket #{ticket.id}: assigned to {assignee.email}"

    return _act(args, settings, work)


def cmd_tickets_priority(args: argparse.Namespace, settings: Settings) -> int:
    """Set a ticket's priority."""

    def work(session: Session, ticket: Ticket, actor: str, agent: Agent | None) -> str:
        was = ticket.priority
        ticket_life.set_priority(session, ticket=ticket, priority=args.priority, actor=actor)
        return f"ticket #{ticket.id}: priority {args.priority} (was {was})"

    return _act(args, settings, work)


def cmd_tickets_note(args: argparse.Namespace, settings: Settings) -> int:
    """Add an internal note to a ticket: for the agents, never sent to the customer."""
    if not args.as_agent:
        raise CommandError("a note needs its author: --as AGENT")
    text = sys.stdin.read() if args.text == "-" else args.text

    def work(session: Session, ticket: Ticket, actor: str, agent: Agent | None) -> str:
        assert agent is not None  # --as is required above.
        note = ticket_life.add_note(session, ticket=ticket, agent=agent, text=text, actor=actor)
        return f"ticket #{ticket.id}: internal note {note.id} added"

    return _act(args, settings, work)


def cmd_tickets_merge(args: argparse.Namespace, settings: Settings) -> int:
    """Move a ticket's thread into another ticket and close it."""

    def work(session: Session, ticket: Ticket, actor: str, agent: Agent | None) -> str:
        target = _ticket(session, args.into)
        if agent is not None:
            ticket_life.check_agent(session, ticket=target, agent=agent)
        moved = ticket_life.merge(session, source=ticket, target=target, actor=actor)
        return (f"ticket #{ticket.id}: merged into #{target.id} ({moved} messages moved); "
                f"#{ticket.id} is closed")

    return _act(args, settings, work)


def cmd_tickets_watch(args: argparse.Namespace, settings: Settings) -> int:
    """Let an agent hear of a ticket's follow-ups."""
    if args.email is None and not args.as_agent:
        raise CommandError("name the agent who watches: EMAIL or --as AGENT")

    def work(session: Session, ticket: Ticket, actor: str, agent: Agent | None) -> str:
        watcher = _agent(session, args.email) if args.email else agent
        assert watcher is not None  # EMAIL or --as is required above.
        ticket_life.watch(session, ticket=ticket, agent=watcher, actor=actor)
        return f"ticket #{ticket.id}: watched by {watcher.email}"

    return _act(args, settings, work)


def _with_ref(command: Any, name: str, help_text: str, handler: Any) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = command(name, help_text, handler)
    sub.add_argument("ref", type=int, metavar="REF")
    sub.add_argument("--as", dest="as_agent", metavar="AGENT",
                     help="the agent's email in whose name to act, for the audit log "
                          "(default: cli:<OS user>)")
    return sub


def add_parsers(command: Any) -> None:
    """Add the ticket actions to the parser."""
    for leaf, help_text in (
        ("close", "close a ticket"),
        ("pending", "mark a ticket pending: waiting for the customer (it closes itself after "
                    "[tickets] pending_close_days without an answer)"),
        ("solve", "mark a ticket solved (it closes itself after [tickets] solved_close_days)"),
    ):
        sub = _with_ref(command, f"tickets {leaf}", help_text, cmd_tickets_status)
        sub.set_defaults(status_command=leaf)
    _with_ref(command, "tickets reopen", "open a solved or closed ticket again",
              cmd_tickets_reopen)
    sub = _with_ref(command, "tickets assign", "give a ticket to one agent, or to nobody",
                    cmd_tickets_assign)
    sub.add_argument("email", nargs="?", metavar="EMAIL|me",
                     help="the agent's email, or me (the --as agent)")
    sub.add_argument("--none", action="store_true", help="assign the ticket to nobody")
    sub = _with_ref(command, "tickets priority", "set a ticket's priority", cmd_tickets_priority)
    sub.add_argument("priority", choices=PRIORITIES)
    sub = _with_ref(command, "tickets note",
                    "add an internal note (never sent to the customer); needs --as",
                    cmd_tickets_note)
    sub.add_argument("text", metavar="TEXT", help="the note, or - to read it from stdin")
    sub = _with_ref(command, "tickets merge",
                    "move a ticket's messages into ticket INTO and close it", cmd_tickets_merge)
    sub.add_argument("into", type=int, metavar="INTO")
    sub = _with_ref(command, "tickets watch", "let an agent hear of a ticket's follow-ups",
                    cmd_tickets_watch)
    sub.add_argument("email", nargs="?", metavar="EMAIL", help="default: the --as agent")
    sub = command(
        "tickets revoke",
        "revoke every reply address issued so far for a ticket (a leaked notification, say): "
        "replies to them are no longer taken as the agent's or the customer's",
        cmd_tickets_revoke,
    )
    sub.add_argument("ref", type=int, metavar="REF")
    sub.add_argument("--as", dest="as_agent", metavar="AGENT",
                     help="who does it, for the audit log (default: cli:<OS user>)")
