"""The `outbox` commands: what waits to leave, what left, what failed and why.

`outbox show` prints a mail decoded (headers as text, the plain-text part as text), never its
quoted-printable bytes. `outbox retry` puts failed mails back in the queue, due at once; the
retried mail's deadline still counts from when it was first queued, so a relay that is still
down fails it again at its first temporary failure, and the operator sees that at once.
"""

from __future__ import annotations

import argparse
import json
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from maildesk.cli.errors import CommandError, NotFound
from maildesk.cli.output import print_json, table, terminal_safe
from maildesk.config import Settings
from maildesk.outbound.compose import outgoing_bytes
from maildesk.store import database
from maildesk.store.models import AuditEvent, Outbox, utcnow

STATUSES = ("pending", "sending", "sent", "failed")
# The audit actions that say a mail of a ticket did not reach its recipient.
DELIVERY_PROBLEMS = ("mail.failed", "mail.undeliverable", "mail.delayed")


def _recipients(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError:
        return [text]
    return [str(v) for v in value] if isinstance(value, list) else [text]


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def outbox_view(row: Outbox) -> dict[str, Any]:
    """One outbox row as the CLI shows it (without the mail itself)."""
    return {
        "id": row.id, "kind": row.kind, "status": row.status, "ticket": row.ticket_id,
        "recipients": _recipients(row.recipients), "message_id": row.message_id,
        "created_at": _iso(row.created_at), "next_attempt_at": _iso(row.next_attempt_at),
        "sent_at": _iso(row.sent_at), "attempts": row.attempts, "deferrals": row.deferrals,
        "last_error": row.last_error,
    }  # fmt: skip


def delivery_problems(session: Session, ticket_id: int) -> list[dict[str, Any]]:
    """The ticket's mails that failed or bounced: which mail, to whom, why and when."""
    events = session.exec(
        select(AuditEvent)
        .where(AuditEvent.ticket_id == ticket_id, col(AuditEvent.action).in_(DELIVERY_PROBLEMS))
        .order_by(col(AuditEvent.id))
    )
    problems = []
    for event in events:
        try:
            detail = json.loads(event.detail or "{}")
        except ValueError:
            detail = {}
        if not isinstance(detail, dict):
            detail = {}
        recipients = detail.get("recipients") or [detail.get("recipient")]
        problems.append({
            "at": _iso(event.at), "action": event.action, "outbox": detail.get("outbox"),
            "kind": detail.get("kind"), "recipients": [r for r in recipients if r],
            "reason": detail.get("reason") or " ".join(
                str(detail.get(k) or "") for k in ("status", "diagnostic")).strip(),
        })  # fmt: skip
    return problems


def _open(settings: Settings) -> sa.Engine:
    engine = database.make_engine(settings.store_url)
    database.check_schema(engine)
    return engine


def cmd_outbox_list(args: argparse.Namespace, settings: Settings) -> int:
    """List outgoing mails, newest first."""
    engine = _open(settings)
    try:
        with Session(engine) as session:
            query = select(Outbox).order_by(col(Outbox.id).desc()).limit(args.limit)
            if args.status:
                query = query.where(Outbox.status == args.status)
            views = [outbox_view(row) for row in session.exec(query)]
    finally:
        engine.dispose()
    if args.json:
        print_json(views)
        return 0
    table(
        [[v["id"], v["status"], v["kind"], f"#{v['ticket']}" if v["ticket"] else "",
          ", ".join(v["recipients"]), (v["created_at"] or "")[:16].replace("T", " "),
          v["last_error"] or ""] for v in views],
        ["ID", "STATUS", "KIND", "TICKET", "TO", "QUEUED", "LAST ERROR"],
    )  # fmt: skip
    return 0


def _body_text(mail: EmailMessage) -> str:
    part = mail.get_body(preferencelist=("plain",))
    if part is None:
        return "(no text part)"
    try:
        return str(part.get_content())
    except (LookupError, ValueError) as exc:
        return f"(the text part cannot be decoded: {exc})"


def cmd_outbox_show(args: argparse.Namespace, settings: Settings) -> int:
    """Show one outgoing mail, decoded."""
    engine = _open(settings)
    try:
        with Session(engine) as session:
            row = session.get(Outbox, args.id)
            if row is None:
                raise NotFound(f"no outgoing mail with id {args.id}")
            view = outbox_view(row)
            try:
                raw = outgoing_bytes(row.raw, row.draft, settings.desk.state_dir)
            except ValueError as exc:
                raise CommandError(f"outgoing mail {args.id} cannot be composed: {exc}") from None
    finally:
        engine.dispose()
    mail = message_from_bytes(raw, policy=policy.default)
    assert isinstance(mail, EmailMessage)
    view["headers"] = {name: str(mail.get(name, "")) for name in
                       ("From", "To", "Reply-To", "Subject", "Date", "Message-ID") if name in mail}
    view["text"] = _body_text(mail)
    view["attachments"] = [part.get_filename() for part in mail.iter_attachments()]
    if args.json:
        print_json(view)
        return 0
    for key in ("id", "kind", "status", "ticket", "recipients", "created_at", "next_attempt_at",
                "sent_at", "deferrals", "last_error"):
        value = ", ".join(view[key]) if key == "recipients" else view[key]
        print(f"{key + ':':17}{terminal_safe(value)}")
    print()
    for name, value in view["headers"].items():
        print(f"{name}: {terminal_safe(value)}")
    print()
    print(terminal_safe(view["text"], multiline=True))
    for name in view["attachments"]:
        print(f"[attachment: {terminal_safe(name)}]")
    return 0


def cmd_outbox_retry(args: argparse.Namespace, settings: Settings) -> int:
    """Put failed mails back in the queue, due at once."""
    if (args.id is None) == (not args.failed):
        raise CommandError("give one outgoing mail's ID, or --failed for every failed mail")
    engine = _open(settings)
    try:
        with database.session_scope(engine) as session:
            query = select(Outbox).where(Outbox.status == "failed")
            if args.id is not None:
                row = session.get(Outbox, args.id)
                if row is None:
                    raise NotFound(f"no outgoing mail with id {args.id}")
                if row.status != "failed":
                    raise CommandError(f"mail {args.id} is {row.status}, not failed")
                query = query.where(Outbox.id == args.id)
            rows = list(session.exec(query))
            now = utcnow()
            for row in rows:
                row.status, row.next_attempt_at, row.deferrals, row.attempts = "pending", now, 0, 0
                session.add(row)
                session.add(AuditEvent(
                    actor=args.actor, action="outbox.retry", ticket_id=row.ticket_id,
                    detail=json.dumps({"outbox": row.id, "last_error": row.last_error}),
                ))  # fmt: skip
    finally:
        engine.dispose()
    print(f"{len(rows)} mail{'s' if len(rows) != 1 else ''} queued again")
    return 0


def add_parsers(command: Any) -> None:
    """Add the outbox commands."""
    sub = command("outbox list", "list outgoing mails, newest first", cmd_outbox_list)
    sub.add_argument("--status", choices=STATUSES)
    sub.add_argument("--limit", type=int, default=200, help="at most this many (default 200)")
    sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub = command("outbox show", "show one outgoing mail, decoded", cmd_outbox_show)
    sub.add_argument("id", type=int, metavar="ID")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub = command("outbox retry", "queue failed mails again, due at once", cmd_outbox_retry)
    sub.add_argument("id", type=int, metavar="ID", nargs="?")
    sub.add_argument("--failed", action="store_true", help="every failed mail")
