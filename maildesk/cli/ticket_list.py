"""`maildesk tickets list`: the tickets, filtered and sorted, with who works on each.

Like every listing, it shows every row whatever is stored: a ticket that cannot be read is
listed as unreadable, with the reason, among the others.
"""

from __future__ import annotations

import argparse
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from maildesk.cli.errors import NotFound
from maildesk.cli.output import print_json, table
from maildesk.cli.tickets import (
    _load_all,
    _minute,
    _reading,
    _shown,
    _unreadable_ticket,
    _why,
    ticket_view,
)
from maildesk.config import Settings
from maildesk.rules.lifecycle import PRIORITIES, STATUSES
from maildesk.store import directory
from maildesk.store.models import Ticket

HEADINGS = ["TICKET", "STATUS", "PRIORITY", "UPDATED", "REQUESTER", "COMPANY", "ASSIGNEE",
            "SUBJECT", "MESSAGES"]


def _filters(session: Any, args: argparse.Namespace) -> list[Any]:
    """The WHERE clauses that the options ask for; an unknown agent or company is not found."""
    where: list[Any] = []
    if args.status:
        where.append(Ticket.status == args.status)
    if args.priority:
        where.append(Ticket.priority == args.priority)
    if args.assignee is not None:
        if args.assignee.strip().lower() == "none":
            where.append(col(Ticket.assignee_id).is_(None))
        else:
            agent = directory.find_agent(session, args.assignee)
            if agent is None:
                raise NotFound(f"no agent with email {args.assignee.strip()}")
            where.append(Ticket.assignee_id == agent.id)
    if args.company is not None:
        company = directory.find_company(session, args.company)
        if company is None:
            raise NotFound(f'no company "{args.company.strip()}"')
        where.append(Ticket.company_id == company.id)
    return where


def _sorted(views: list[dict[str, Any]], sort: str | None) -> list[dict[str, Any]]:
    """Newest first; by age, the oldest first; by update, the most recently updated first.

    Unreadable rows, which have no dates, come last in either order.
    """
    if sort == "age":
        return sorted(views, key=lambda v: (v["created_at"] is None, v["created_at"] or ""))
    if sort == "updated":
        dated = sorted((v for v in views if v["updated_at"]), key=lambda v: v["updated_at"],
                       reverse=True)
        return dated + [v for v in views if not v["updated_at"]]
    return views


def _assignee(view: dict[str, Any]) -> str:
    if view["unattended"]:
        return "unattended"
    return str(view["assignee"] or "-") if "row" not in view["unreadable"] else ""


def cmd_tickets_list(args: argparse.Namespace, settings: Settings) -> int:
    """List tickets, newest first unless --sort says otherwise."""
    views = []
    with _reading(settings) as session:
        where = _filters(session, args)
        for ref, ticket, why in _load_all(session, Ticket, *where, newest_first=True):
            try:
                views.append(ticket_view(session, ticket, with_text=args.json) if ticket
                             else _unreadable_ticket(ref, why or "?"))
            except sa.exc.DBAPIError:
                raise
            except Exception as exc:
                views.append(_unreadable_ticket(ref, _why(exc)))
    views = _sorted(views, args.sort)
    if args.json:
        print_json(views)
        return 0
    table(
        [
            [f"#{v['ref']}", v["status"], v["priority"], _minute(v["updated_at"]),
             _shown(v, "requester"), _shown(v, "company"), _assignee(v),
             _shown(v, "subject", or_row=True), len(v["messages"])]
            for v in views
        ],
        HEADINGS,
    )
    return 0


def add_parsers(command: Any) -> None:
    """Register `tickets list`."""
    sub = command("tickets list", "list tickets, newest first", cmd_tickets_list)
    sub.add_argument("--status", choices=STATUSES)
    sub.add_argument("--priority", choices=PRIORITIES)
    sub.add_argument("--assignee", metavar="EMAIL|none",
                     help="only the tickets of this agent, or (none) of nobody")
    sub.add_argument("--company", metavar="NAME", help="only this company's tickets")
    sub.add_argument("--sort", choices=("age", "updated"),
                     help="age: the oldest first; updated: the most recently updated first")
    sub.add_argument("--json", action="store_true",
                     help="print JSON: reference, subject, status, priority, requester, company, "
                          "assignee, watchers, followers, history, messages")
