"""Commands that act on one ticket: `tickets revoke` so far."""

from __future__ import annotations

import argparse
from typing import Any

from maildesk.cli.errors import NotFound
from maildesk.config import Settings
from maildesk.store import database
from maildesk.store.models import Ticket
from maildesk.store.tickets import revoke_reply_addresses


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


def add_parsers(command: Any) -> None:
    """Add the ticket actions to the parser."""
    sub = command(
        "tickets revoke",
        "revoke every reply address issued so far for a ticket (a leaked notification, say): "
        "replies to them are no longer taken as the agent's or the customer's",
        cmd_tickets_revoke,
    )
    sub.add_argument("ref", type=int, metavar="REF")
    sub.add_argument("--as", dest="as_agent", metavar="AGENT",
                     help="who does it, for the audit log (default: cli:<OS user>)")
