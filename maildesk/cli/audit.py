"""The `audit` command: the audit trail, access log included, with filters."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from maildesk.cli.errors import NotFound
from maildesk.cli.output import print_json, table
from maildesk.config import Settings
from maildesk.store import database
from maildesk.store.models import Account, AuditEvent


def _since(text: str) -> datetime:
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a date like 2026-12-31, got "{text}"') from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _view(event: AuditEvent) -> dict[str, Any]:
    try:
        detail = json.loads(event.detail) if event.detail else None
    except ValueError:
        detail = event.detail
    return {"id": event.id, "at": event.at.isoformat(), "actor": event.actor,
            "action": event.action, "ticket": event.ticket_id, "account": event.account_id,
            "detail": detail}


def cmd_audit_list(args: argparse.Namespace, settings: Settings) -> int:
    """List audit events, oldest first, with filters."""
    where: list[Any] = []
    engine = database.make_engine(settings.store_url)
    try:
        database.check_schema(engine)
        with Session(engine) as session:
            if args.account:
                email = args.account.strip().lower()
                account = session.exec(select(Account).where(Account.email == email)).first()
                if account is None:
                    raise NotFound(f"no account with email {args.account.strip()}")
                where.append(sa.or_(col(AuditEvent.account_id) == account.id,
                                    sa.func.lower(AuditEvent.actor) == email))
            if args.ticket is not None:
                where.append(col(AuditEvent.ticket_id) == args.ticket)
            if args.action:
                # "access" stands for every access.* action.
                where.append(sa.or_(col(AuditEvent.action) == args.action,
                                    col(AuditEvent.action).startswith(f"{args.action}.",
                                                                      autoescape=True)))
            if args.since is not None:
                where.append(col(AuditEvent.at) >= args.since)
            query = select(AuditEvent).where(*where).order_by(col(AuditEvent.at),
                                                              col(AuditEvent.id))
            views = [_view(e) for e in session.exec(query)]
    finally:
        engine.dispose()
    if args.json:
        print_json(views)
        return 0
    table([[v["at"][:19].replace("T", " "), v["actor"], v["action"],
            f"#{v['ticket']}" if v["ticket"] is not None else "", v["account"] or "",
            json.dumps(v["detail"], ensure_ascii=False) if v["detail"] is not None else ""]
           for v in views], ["AT", "ACTOR", "ACTION", "TICKET", "ACCOUNT", "DETAIL"],
          max_width=80)
    return 0


def add_parsers(command: Any) -> None:
    """Add the audit command to the parser."""
    sub = command("audit list", "list audit events, oldest first (the access log included)",
                  cmd_audit_list)
    sub.add_argument("--ticket", type=int, metavar="N", help="only events about ticket N")
    sub.add_argument("--account", metavar="EMAIL", help="only events about this account")
    sub.add_argument("--action", metavar="A", help='one action, or a family such as "access"')
    sub.add_argument("--since", type=_since, metavar="DATE", help="only events from DATE on")
    sub.add_argument("--json", action="store_true")
