"""The `tickets` and `quarantine` commands: what agents look at from the shell.

A listing shows every row, whatever is stored: a row that cannot be read (an odd value in the
database, a raw mail gone from disk, a header the email package chokes on) is shown as
unreadable, with the reason, among the others, and the command still succeeds.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import policy
from email.headerregistry import HeaderRegistry, UnstructuredHeader
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from maildesk.cli.errors import NotFound
from maildesk.cli.outbox import delivery_problems
from maildesk.cli.output import print_json, table, terminal_safe
from maildesk.config import Settings
from maildesk.store import database, ticket_life
from maildesk.store.models import Account, Attachment, Company, InboundMail, Message, Ticket

# Bounds on what a listing reads of a stored raw mail to show its sender and subject.
HEADER_BYTES = 64 * 1024
MAX_HEADER_FIELDS = 500

# Every header read as unstructured text: it decodes RFC 2047 words, which is all a listing
# needs, while the address parser of policy.default recurses once per nested comment (so 1,200
# of them raise RecursionError) and takes quadratic time on some hostile values.
_DISPLAY_POLICY = policy.default.clone(
    header_factory=HeaderRegistry(default_class=UnstructuredHeader, use_default_map=False)
)


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


def _why(exc: BaseException) -> str:
    return type(exc).__name__


def _raw_missing(exc: OSError) -> str:
    return "raw mail missing" if isinstance(exc, FileNotFoundError) else f"raw mail: {_why(exc)}"


def _load_all(
    session: Session, model: Any, *where: Any, newest_first: bool = False
) -> list[tuple[int, Any, str | None]]:
    """The rows of `model` matching `where` as (id, row, None), or (id, None, why) if unreadable."""
    order = col(model.id).desc() if newest_first else col(model.id)
    try:
        return [(r.id, r, None) for r in session.exec(select(model).where(*where).order_by(order))]
    except sa.exc.DBAPIError:
        raise  # The database itself failed: that is no row's fault.
    except Exception:
        # One odd value fails the whole query; reading row by row finds which row it is in.
        ids = session.exec(select(model.id).where(*where).order_by(order)).all()
    loaded = [(row_id, *_get(session, model, row_id)) for row_id in ids]
    return [(row_id, row, why) for row_id, row, why in loaded if row is not None or why]


def _get(session: Session, model: Any, row_id: Any) -> tuple[Any, str | None]:
    """One row by id, or the reason it cannot be read."""
    try:
        return session.get(model, row_id), None
    except sa.exc.DBAPIError:
        raise
    except Exception as exc:
        return None, _why(exc)


def _message_entry(session: Session, message: Message, *, with_text: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "direction": message.direction,
        "author": message.author_name,
        "author_email": message.author_email,
        "author_kind": message.author_kind,
        "created_at": _iso(message.created_at),
        "matched_by": message.matched_by,
        "rule": message.rule,
        "internal": message.internal,
        "message_id": message.message_id,
        "attachments": [
            {"filename": a.filename, "content_type": a.content_type, "size": a.size,
             "inline": a.inline, "unreadable": {}}
            if a is not None
            else {"filename": None, "content_type": None, "size": None, "inline": None,
                  "unreadable": {"row": why}}
            for _, a, why in _load_all(session, Attachment, Attachment.message_id == message.id)
        ],
        "unreadable": {},
    }
    if with_text:
        entry["text"] = message.text
    return entry


def ticket_view(session: Session, ticket: Ticket, *, with_text: bool) -> dict[str, Any]:
    """A ticket as the CLI shows it, with its thread; parts that cannot be read say why."""
    unreadable: dict[str, str] = {}
    account, why = _get(session, Account, ticket.account_id)
    if why:
        unreadable["requester"] = why
    company, why = _get(session, Company, ticket.company_id)
    if why:
        unreadable["company"] = why
    thread = []
    for _, message, why in _load_all(session, Message, Message.ticket_id == ticket.id):
        if message is not None:
            try:
                thread.append(_message_entry(session, message, with_text=with_text))
                continue
            except sa.exc.DBAPIError:
                raise
            except Exception as exc:
                why = _why(exc)
        thread.append({"unreadable": {"row": why}, "attachments": [],
                       **({"text": None} if with_text else {})})
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
        "delivery_problems": delivery_problems(session, ticket.id) if ticket.id else [],
        **ticket_life.describe(session, ticket),
        "unreadable": unreadable,
    }


def _unreadable_ticket(ref: int, why: str) -> dict[str, Any]:
    names = ("subject", "status", "requester", "requester_name", "company", "created_at",
             "updated_at", "priority", "assignee", "status_changed_at", "merged_into", "follows",
             "unattended")
    return {"ref": ref, **dict.fromkeys(names), "messages": [], "delivery_problems": [],
            "watchers": [], "followers": [], "history": [], "unreadable": {"row": why}}


def _shown(view: dict[str, Any], key: str, *, or_row: bool = False) -> str:
    """A view's value for a person: "(unreadable: why)" where it (or, if `or_row`, its row) is."""
    why = view["unreadable"].get(key) or (view["unreadable"].get("row") if or_row else None)
    return f"(unreadable: {why})" if why else terminal_safe(view.get(key))


def _minute(value: Any) -> str:
    return value[:16].replace("T", " ") if isinstance(value, str) else ""


def cmd_tickets_show(args: argparse.Namespace, settings: Settings) -> int:
    """Show one ticket and its thread."""
    from maildesk.store.access_log import operator, record_read

    with _reading(settings) as session:
        ticket, why = _get(session, Ticket, args.ref)
        if why:
            raise NotFound(f"ticket #{args.ref} cannot be read ({why})")
        if ticket is None:
            raise NotFound(f"no ticket #{args.ref}")
        view = ticket_view(session, ticket, with_text=True)
        # The read is logged, and committed, before anything is shown.
        record_read(session, actor=operator(getattr(args, "as_agent", None),
                                            getattr(args, "actor", None)),
                    ticket_id=ticket.id, what="ticket")
        session.commit()
    if args.json:
        print_json(view)
        return 0
    safe = terminal_safe
    print(f"#{view['ref']} {safe(view['subject'])}")
    print(f"status: {safe(view['status'])}; requester: {_shown(view, 'requester_name')} "
          f"<{_shown(view, 'requester')}> ({_shown(view, 'company')}); "
          f"opened {safe(view['created_at'])}")
    print(life_line(view))
    for m in view["messages"]:
        if "row" in m["unreadable"]:
            print(f"\n--- (unreadable message: {m['unreadable']['row']})")
            continue
        print(f"\n--- {safe(m['created_at'])} {safe(m['author_kind'])} {safe(m['author'])} "
              f"<{safe(m['author_email'])}>" + (" (internal note)" if m["internal"] else ""))
        print(terminal_safe(m["text"], multiline=True))
        for a in m["attachments"]:
            print(f"[attachment: {_shown(a, 'filename', or_row=True)} "
                  f"({safe(a['content_type'])}, {safe(a['size'])} bytes)]")
    for problem in view["delivery_problems"]:
        # A mail that never reached its recipient: which one, to whom, and why.
        print(f"\n!!! {safe(problem['at'])} {safe(problem['action'])}: outgoing mail "
              f"{safe(problem['outbox'])} ({safe(problem['kind'])}) to "
              f"{safe(', '.join(problem['recipients']))}: {safe(problem['reason'])}")
    if view["history"]:
        print("\nhistory:")
    for entry in view["history"]:
        print(f"  {_minute(entry['at'])} {safe(entry['actor'])} {safe(entry['action'])}"
              f"{safe(_change(entry['detail']))}")
    return 0


def life_line(view: dict[str, Any]) -> str:
    """The line of `tickets show` with the ticket's priority, people and links."""
    assignee = view["assignee"] or ("nobody (unattended)" if view["unattended"] else "nobody")
    parts = [f"priority: {view['priority']}", f"assignee: {assignee}",
             f"watchers: {', '.join(view['watchers']) or 'none'}",
             f"followers: {', '.join(view['followers']) or 'none'}"]
    if view["merged_into"] is not None:
        parts.append(f"merged into #{view['merged_into']}")
    if view["follows"] is not None:
        parts.append(f"follows #{view['follows']}")
    return terminal_safe("; ".join(parts))


def _change(detail: dict[str, Any]) -> str:
    if "from" in detail or "to" in detail:
        rest = {k: v for k, v in detail.items() if k not in ("from", "to")}
        text = f": {detail.get('from') or '-'} -> {detail.get('to') or '-'}"
    else:
        rest, text = detail, ""
    extras = ", ".join(f"{key} {value}" for key, value in rest.items())
    return f"{text} ({extras})" if extras else text


@dataclass(frozen=True)
class DisplayHeaders:
    """A stored mail's From and Subject for display, and why any of them could not be read."""

    sender: str | None
    subject: str | None
    unreadable: dict[str, str] = field(default_factory=dict)


def _header_section(head: bytes) -> tuple[bytes, bool]:
    """The header fields at the start of `head`, at most MAX_HEADER_FIELDS; and whether all."""
    kept: list[bytes] = []
    fields = 0
    for line in head.splitlines(keepends=True):
        if not line.strip(b"\r\n"):
            return b"".join(kept), True  # The empty line that ends the header section.
        if line[:1] not in (b" ", b"\t"):
            fields += 1
            if fields > MAX_HEADER_FIELDS:
                return b"".join(kept), False
        kept.append(line)
    return b"".join(kept), len(head) < HEADER_BYTES


def read_display_headers(path: Path) -> DisplayHeaders:
    """The From and Subject of the raw mail at `path`, read within bounds; never raises."""
    try:
        with path.open("rb") as handle:
            head = handle.read(HEADER_BYTES)
    except OSError as exc:
        why = _raw_missing(exc)
        return DisplayHeaders(None, None, {"from": why, "subject": why})
    section, whole = _header_section(head)
    values: dict[str, str | None] = {}
    unreadable: dict[str, str] = {}
    try:
        headers = BytesHeaderParser(policy=_DISPLAY_POLICY).parsebytes(section)
    except Exception as exc:  # The email package has no common base class for its failures.
        return DisplayHeaders(None, None, {"from": _why(exc), "subject": _why(exc)})
    for key, name in (("from", "From"), ("subject", "Subject")):
        try:
            value = headers.get(name)
        except Exception as exc:
            values[key], unreadable[key] = None, _why(exc)
            continue
        if value is None and not whole:
            values[key], unreadable[key] = None, "beyond the headers read"
        else:
            values[key] = "" if value is None else str(value)
    return DisplayHeaders(values["from"], values["subject"], unreadable)


def _quarantine_view(settings: Settings, inbound: InboundMail) -> dict[str, Any]:
    headers = read_display_headers(settings.desk.state_dir / inbound.raw_path)
    return {
        "id": inbound.id,
        "received_at": _iso(inbound.received_at),
        "source": inbound.source,
        "from": headers.sender,
        "subject": headers.subject,
        "reason": inbound.reason,
        "message_id": inbound.message_id,
        "size": inbound.size,
        "envelope_from": inbound.envelope_from,
        "unreadable": headers.unreadable,
    }


def _unreadable_mail(mail_id: int, why: str) -> dict[str, Any]:
    names = ("received_at", "source", "from", "subject", "reason", "message_id", "size",
             "envelope_from")
    return {"id": mail_id, **dict.fromkeys(names), "unreadable": {"row": why}}


def cmd_quarantine_list(args: argparse.Namespace, settings: Settings) -> int:
    """List the mails held in quarantine."""
    views = []
    with _reading(settings) as session:
        held = _load_all(session, InboundMail, InboundMail.outcome == "quarantined")
        for mail_id, inbound, why in held:
            try:
                views.append(_quarantine_view(settings, inbound) if inbound
                             else _unreadable_mail(mail_id, why or "?"))
            except Exception as exc:
                views.append(_unreadable_mail(mail_id, _why(exc)))
        total = session.exec(select(func.count()).select_from(InboundMail)).one()
    if args.json:
        print_json(views)
        return 0
    table(
        [
            [v["id"], _minute(v["received_at"]),
             _shown(v, "from") if v["from"] != "" else terminal_safe(v["envelope_from"]),
             _shown(v, "subject", or_row=True), v["reason"]]
            for v in views
        ],
        ["MAIL", "RECEIVED", "SENDER", "SUBJECT", "REASON"],
    )
    print(f"{len(views)} held in quarantine, of {total} mails received; "
          "`maildesk quarantine show MAIL` shows one")
    return 0


def cmd_quarantine_show(args: argparse.Namespace, settings: Settings) -> int:
    """Show one quarantined mail: why it was held, and its text."""
    from maildesk.mail.parse import MalformedMail, parse_mail

    with _reading(settings) as session:
        inbound, why = _get(session, InboundMail, args.id)
        if why:
            raise NotFound(f"mail {args.id} cannot be read ({why})")
        if inbound is None or inbound.outcome != "quarantined":
            raise NotFound(f"no quarantined mail with id {args.id}")
        view = _quarantine_view(settings, inbound)
    raw_path = settings.desk.state_dir / inbound.raw_path
    view["text"], view["parse_error"] = None, None
    try:
        view["text"] = parse_mail(raw_path.read_bytes()).text
    except OSError as exc:
        view["parse_error"] = _raw_missing(exc)
    except MalformedMail as exc:
        view["parse_error"] = exc.reason
    except Exception as exc:  # parse_mail should say MalformedMail; a stored mail may not.
        view["parse_error"] = f"cannot parse mail ({_why(exc)})"
    view["raw_path"] = str(raw_path)
    if args.json:
        print_json(view)
        return 0
    for key in view:
        if key not in ("text", "unreadable"):
            print(f"{('mail' if key == 'id' else key) + ':':15}{_shown(view, key)}")
    print()
    print(terminal_safe(view["text"], multiline=True) if view["text"] is not None
          else "(the mail could not be parsed)")
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
        print(f"mail {args.id} is still held: {terminal_safe(outcome.reason)}")
        return 1
    print(f"mail {args.id} released: {terminal_safe(outcome.outcome)}, "
          f"ticket #{outcome.ticket_id}")
    return 0


def add_parsers(command: Any) -> None:
    """Register the tickets and quarantine commands with the main parser (`tickets list` is in
    cli/ticket_list.py)."""
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
