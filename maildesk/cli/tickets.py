"""The `tickets` and `quarantine` commands: what agents look at from the shell."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from email import policy
from email.parser import BytesHeaderParser
from typing import Any

from sqlmodel import Session, col, func, select

from maildesk.config import Settings
from maildesk.store import database
from maildesk.store.files import read_raw
from maildesk.store.models import Account, Attachment, Company, InboundMail, Message, Ticket


class NotFound(Exception):
    """The ticket or quarantined mail asked for does not exist."""


@contextmanager
def _reading(settings: Settings) -> Iterator[Session]:
    """A read session on a database whose schema is current."""
    engine = database.make_engine(settings.store_url)
    try:
        database.check_schema(engine)
        with Session(engine) as session:
            yield session
    finally:
        engine.dispose()


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def ticket_view(session: Session, ticket: Ticket, *, with_text: bool) -> dict[str, Any]:
    """A ticket as the CLI shows it, with its thread."""
    account = session.get(Account, ticket.account_id)
    company = session.get(Company, ticket.company_id)
    messages = session.exec(
        select(Message).where(Message.ticket_id == ticket.id).order_by(col(Message.id))
    ).all()
    thread = []
    for message in messages:
        attachments = session.exec(
            select(Attachment).where(Attachment.message_id == message.id)
        ).all()
        entry: dict[str, Any] = {
            "direction": message.direction,
            "author": message.author_name,
            "author_email": message.author_email,
            "author_kind": message.author_kind,
            "created_at": _iso(message.created_at),
            "matched_by": message.matched_by,
            "message_id": message.message_id,
            "attachments": [
                {"filename": a.filename, "content_type": a.content_type, "size": a.size,
                 "inline": a.inline}
                for a in attachments
            ],
        }
        if with_text:
            entry["text"] = message.text
        thread.append(entry)
    return {
        "ref": ticket.id,
        "subject": ticket.subject,
        "status": ticket.status,
        "requester": account.email if account else None,
        "requester_name": account.name if account else None,
        "company": company.name if company else None,
        "created_at": _iso(ticket.created_at),
        "updated_at": _iso(ticket.updated_at),
        "messages": thread,
    }


def _print(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


def cmd_tickets_list(args: argparse.Namespace, settings: Settings) -> int:
    """List tickets, newest first."""
    with _reading(settings) as session:
        query = select(Ticket).order_by(col(Ticket.id).desc())
        if args.status:
            query = query.where(Ticket.status == args.status)
        views = [ticket_view(session, t, with_text=args.json) for t in session.exec(query)]
    if args.json:
        _print(views)
        return 0
    if not views:
        print("(no tickets)")
    for v in views:
        print(f"#{v['ref']:<6} {v['status']:<9} {v['updated_at'][:16]}  {v['requester']} "
              f"({v['company']})  {v['subject']}  [{len(v['messages'])} messages]")
    return 0


def cmd_tickets_show(args: argparse.Namespace, settings: Settings) -> int:
    """Show one ticket and its thread."""
    with _reading(settings) as session:
        ticket = session.get(Ticket, args.ref)
        if ticket is None:
            raise NotFound(f"no ticket #{args.ref}")
        view = ticket_view(session, ticket, with_text=True)
    if args.json:
        _print(view)
        return 0
    print(f"#{view['ref']} {view['subject']}")
    print(f"status: {view['status']}; requester: {view['requester_name']} <{view['requester']}>"
          f" ({view['company']}); opened {view['created_at']}")
    for m in view["messages"]:
        print(f"\n--- {m['created_at']} {m['author_kind']} {m['author']} <{m['author_email']}>")
        print(m["text"])
        for a in m["attachments"]:
            print(f"[attachment: {a['filename']} ({a['content_type']}, {a['size']} bytes)]")
    return 0


def _quarantine_view(settings: Settings, inbound: InboundMail) -> dict[str, Any]:
    try:
        raw = read_raw(settings.desk.state_dir, inbound.raw_path)
        headers = BytesHeaderParser(policy=policy.default).parsebytes(raw)
        sender, subject = str(headers.get("From", "")), str(headers.get("Subject", ""))
    except (OSError, ValueError, IndexError):
        sender, subject = "", ""
    return {
        "id": inbound.id,
        "received_at": _iso(inbound.received_at),
        "source": inbound.source,
        "from": sender,
        "subject": subject,
        "reason": inbound.reason,
        "message_id": inbound.message_id,
        "size": inbound.size,
    }


def cmd_quarantine_list(args: argparse.Namespace, settings: Settings) -> int:
    """List the mails held in quarantine."""
    with _reading(settings) as session:
        held = session.exec(
            select(InboundMail)
            .where(InboundMail.outcome == "quarantined")
            .order_by(col(InboundMail.id))
        ).all()
        views = [_quarantine_view(settings, inbound) for inbound in held]
        total = session.exec(select(func.count()).select_from(InboundMail)).one()
    if args.json:
        _print(views)
        return 0
    for v in views:
        print(f"{v['id']:<6} {v['received_at'][:16]}  {v['reason']:<30}  {v['from']}  "
              f"{v['subject']}")
    print(f"{len(views)} held in quarantine, of {total} mails received")
    return 0


def cmd_quarantine_show(args: argparse.Namespace, settings: Settings) -> int:
    """Show one quarantined mail: why it was held, and its text."""
    from maildesk.mail.parse import MalformedMail, parse_mail

    with _reading(settings) as session:
        inbound = session.get(InboundMail, args.id)
        if inbound is None or inbound.outcome != "quarantined":
            raise NotFound(f"no quarantined mail with id {args.id}")
        view = _quarantine_view(settings, inbound)
    raw = read_raw(settings.desk.state_dir, inbound.raw_path)
    try:
        view["text"] = parse_mail(raw).text
    except MalformedMail as exc:
        view["text"] = None
        view["parse_error"] = exc.reason
    view["raw_path"] = str(settings.desk.state_dir / inbound.raw_path)
    if args.json:
        _print(view)
        return 0
    for key, value in view.items():
        if key != "text":
            print(f"{key + ':':13}{'' if value is None else value}")
    print()
    print(view["text"] if view["text"] is not None else "(the mail could not be parsed)")
    return 0


def cmd_quarantine_release(args: argparse.Namespace, settings: Settings) -> int:
    """File a quarantined mail again, now that its sender may be known."""
    from maildesk.pipeline import Pipeline

    engine = database.make_engine(settings.store_url)
    database.check_schema(engine)
    try:
        outcome = Pipeline(settings, engine).release(args.id, actor=args.actor)
    except ValueError as exc:
        raise NotFound(str(exc)) from None
    finally:
        engine.dispose()
    if outcome.quarantined:
        print(f"mail {args.id} is still held: {outcome.reason}")
        return 1
    print(f"mail {args.id} released: {outcome.outcome}, ticket #{outcome.ticket_id}")
    return 0


def add_parsers(command: Any) -> None:
    """Register the tickets and quarantine commands with the main parser."""
    sub = command("tickets list", "list tickets, newest first")
    sub.add_argument("--status", choices=("open", "answered", "closed"))
    sub.add_argument("--json", action="store_true",
                     help="print JSON: reference, subject, status, requester, company, messages")
    sub = command("tickets show", "show a ticket and its thread")
    sub.add_argument("ref", type=int, metavar="REF")
    sub.add_argument("--json", action="store_true")
    sub = command("quarantine list", "list the mails held in quarantine, with the reason")
    sub.add_argument("--json", action="store_true")
    sub = command("quarantine show", "show a quarantined mail")
    sub.add_argument("id", type=int, metavar="ID")
    sub.add_argument("--json", action="store_true")
    sub = command("quarantine release", "file a quarantined mail again")
    sub.add_argument("id", type=int, metavar="ID")
