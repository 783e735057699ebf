"""Erasure: an account with everything of theirs, or a set of mails, gone from every copy we hold.

What goes with an account: its tickets with their whole threads (the agents' answers and any
colleague's messages in them go with the ticket: they are the person's ticket), the messages the
person wrote into other tickets (with the notifications that carried them), the attachments and
their files (a file stays while another remaining attachment has the same content), the raw
inbound mails and their copies in the IMAP processed and quarantine folders, the outbox rows to
them or on their tickets, and the account row itself. The row is deleted rather than kept as a
tombstone: a tombstone would still be a row about the person, and nothing needs it. Audit events
about the person stay, pseudonymised: their address and name become a keyed pseudonym
("person:" and 16 hex digits, the same for every event of that person), the action and the time
are kept.

The order makes a kill at any point harmless, and a re-run finishes the work: first the IMAP
copies (found again by the next run while the rows exist), then a journal of the files to delete
(content hashes only), then the rows in one transaction, then the files and the journal. Every
run first finishes the journals that a killed run left behind. On SQLite the deletes overwrite
the freed bytes (secure_delete) and the WAL is checkpointed and truncated, so that the bytes are
gone from the database file and its -wal file too.
"""

from __future__ import annotations

import hmac
import json
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from email import policy
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, SQLModel, col, func, select

from maildesk.config import Settings
from maildesk.logs import get_logger
from maildesk.privacy import imap_copies
from maildesk.privacy.imap_copies import MailCopy
from maildesk.signing import load_reply_keys
from maildesk.store import database
from maildesk.store.files import ATTACHMENTS_DIR, content_path, write_once
from maildesk.store.models import (
    RECEIVED,
    Account,
    Attachment,
    AuditEvent,
    InboundMail,
    Message,
    Outbox,
    Ticket,
    utcnow,
)

log = get_logger("erase")

PENDING_DIR = "erasing"  # journals of files to delete once their rows are gone
HEADER_BYTES = 64 * 1024  # what is read of a raw mail to learn its sender
CHUNK = 500  # ids per IN list, within every database's limit on parameters
# A hook that tests use to stop an erasure between its steps ("imap", "rows", "files").
Hook = Callable[[str], None]


class ErasureError(Exception):
    """An erasure that could not be carried out; nothing of the database was changed."""


def pseudonym(settings: Settings, address: str) -> str:
    """The stable pseudonym that replaces a person's address and name in the audit trail."""
    # Keyed, so that nobody without the desk's key can test a guessed address against it; the
    # key is derived, so that it signs nothing else.
    key = hmac.new(load_reply_keys(settings).current.secret, b"audit pseudonym", "sha256")
    digest = hmac.new(key.digest(), address.strip().lower().encode(), "sha256").hexdigest()
    return f"person:{digest[:16]}"


@dataclass
class Target:
    """The rows and files of one erasure."""

    pseudonym: str
    account_id: int | None = None
    needles: tuple[str, ...] = ()  # what audit events must no longer contain
    tickets: set[int] = field(default_factory=set)
    messages: set[int] = field(default_factory=set)
    attachments: set[int] = field(default_factory=set)
    inbound: set[int] = field(default_factory=set)
    outbox: set[int] = field(default_factory=set)
    audit: set[int] = field(default_factory=set)
    raw_paths: set[str] = field(default_factory=set)
    digests: set[str] = field(default_factory=set)
    copies: list[MailCopy] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many rows of each kind the erasure takes."""
        return {
            "accounts": int(self.account_id is not None), "tickets": len(self.tickets),
            "messages": len(self.messages), "attachments": len(self.attachments),
            "inbound_mails": len(self.inbound), "outbox": len(self.outbox),
            "audit_pseudonymised": len(self.audit),
        }


@dataclass
class ErasureReport:
    """What an erasure did, or would do when `dry_run`."""

    pseudonym: str
    counts: dict[str, int]
    dry_run: bool = False
    files_deleted: int = 0
    imap_deleted: int = 0
    imap_not_found: list[str] = field(default_factory=list)
    wal_truncated: bool = True


def _chunks(ids: Iterable[Any]) -> Iterable[list[Any]]:
    items = sorted(ids)
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def _ids(session: Session, column: Any, *where: Any) -> set[Any]:
    return set(session.exec(select(column).where(*where)))


def _ids_in(session: Session, column: Any, key: Any, values: set[Any]) -> set[Any]:
    found: set[Any] = set()
    for chunk in _chunks(values):
        found |= _ids(session, column, col(key).in_(chunk))
    return found


# Finding a mail's sender


def raw_senders(state_dir: Path, raw_path: str) -> set[str]:
    """The lowercased addresses of a stored raw mail's From header (empty if unreadable)."""
    try:
        with (state_dir / raw_path).open("rb") as handle:
            head = handle.read(HEADER_BYTES)
    except OSError:
        return set()
    try:
        # compat32 leaves the header as text; getaddresses then copes with anything.
        headers = BytesHeaderParser(policy=policy.compat32).parsebytes(head)
        return {a.lower() for _, a in getaddresses(headers.get_all("From", [])) if "@" in a}
    except Exception:  # The email package has no common base class for its failures.
        return set()


def ticketless_senders(session: Session, state_dir: Path) -> dict[int, set[str]]:
    """The senders of every filed mail on no ticket (quarantined, ignored, bounces), by id."""
    query = select(InboundMail).where(
        col(InboundMail.ticket_id).is_(None), col(InboundMail.outcome).not_in([RECEIVED])
    )
    senders = {}
    for inbound in session.exec(query):
        found = raw_senders(state_dir, inbound.raw_path)
        if inbound.envelope_from:
            found.add(inbound.envelope_from.lower())
        senders[inbound.id] = found
    return senders  # type: ignore[return-value]


# What an erasure takes


def _recipients(outbox: Outbox) -> set[str]:
    try:
        return {str(r).lower() for r in json.loads(outbox.recipients)}
    except (ValueError, TypeError):
        return set()


def _in_reply_to(raw: bytes, draft: str | None = None) -> str | None:
    if draft is not None:
        # A draft (outbound/compose.py) is JSON; read here without the outbound stage.
        try:
            value = json.loads(draft).get("in_reply_to")
        except (ValueError, AttributeError):
            return None
        return value.strip() if isinstance(value, str) else None
    try:
        value = BytesHeaderParser(policy=policy.compat32).parsebytes(raw).get("In-Reply-To")
    except Exception:
        return None
    return str(value).strip() if value else None


def _add_mails(session: Session, target: Target, inbound_ids: set[int]) -> None:
    for inbound in (session.get(InboundMail, i) for i in sorted(inbound_ids)):
        if inbound is None:
            continue
        target.inbound.add(inbound.id)  # type: ignore[arg-type]
        target.raw_paths.add(inbound.raw_path)
        if inbound.mailbox is not None:
            target.copies.append(MailCopy(inbound.id, inbound.message_id,  # type: ignore[arg-type]
                                          inbound.sha256, inbound.oversize is not None))


def account_target(
    session: Session, settings: Settings, account: Account,
    senders: dict[int, set[str]] | None = None,
) -> Target:
    """Everything that erasing `account` takes."""
    email = account.email.lower()
    needles = tuple(n for n in (email, account.name, account.phone) if n and len(n) >= 3)
    target = Target(pseudonym(settings, email), account.id, needles)
    target.tickets = _ids(session, Ticket.id, Ticket.account_id == account.id)
    target.messages = _ids_in(session, Message.id, Message.ticket_id, target.tickets)
    own_elsewhere = session.exec(select(Message).where(
        Message.account_id == account.id, col(Message.ticket_id).not_in(target.tickets or {0})
    )).all()
    target.messages |= {m.id for m in own_elsewhere}  # type: ignore[misc]
    target.attachments = _ids_in(session, Attachment.id, Attachment.message_id, target.messages)
    target.digests = _ids_in(session, Attachment.sha256, Attachment.id, target.attachments)
    inbound = _ids_in(session, InboundMail.id, InboundMail.ticket_id, target.tickets)
    inbound |= {i for i in _ids_in(session, Message.inbound_mail_id, Message.id, target.messages)
                if i is not None}
    inbound |= _ids(session, InboundMail.id, func.lower(InboundMail.envelope_from) == email)
    all_senders = senders if senders is not None else ticketless_senders(
        session, settings.desk.state_dir)
    inbound |= {i for i, found in all_senders.items() if email in found}
    _add_mails(session, target, inbound)
    target.outbox = _ids_in(session, Outbox.id, Outbox.ticket_id, target.tickets)
    to_them = select(Outbox).where(col(Outbox.recipients).contains(email, autoescape=True))
    target.outbox |= {o.id for o in session.exec(to_them) if email in _recipients(o)}  # type: ignore[misc]
    # The agents' notifications of the person's messages in other tickets quote them.
    quoted = {m.message_id for m in own_elsewhere if m.message_id}
    for ticket_id in {m.ticket_id for m in own_elsewhere}:
        for row in session.exec(select(Outbox).where(Outbox.ticket_id == ticket_id)):
            if _in_reply_to(row.raw, row.draft) in quoted:
                target.outbox.add(row.id)  # type: ignore[arg-type]
    about = sa.or_(
        col(AuditEvent.account_id) == account.id, func.lower(AuditEvent.actor) == email,
        func.lower(col(AuditEvent.detail)).contains(email, autoescape=True),
        *(col(AuditEvent.ticket_id).in_(chunk) for chunk in _chunks(target.tickets)),
    )
    target.audit = _ids(session, AuditEvent.id, about)
    return target


def mails_target(
    session: Session, label: str, inbound_ids: set[int], outbox_ids: set[int]
) -> Target:
    """Mails (and outbox rows) to erase on their own, such as strangers' after quarantine."""
    target = Target(label, outbox=set(outbox_ids))
    _add_mails(session, target, inbound_ids)
    return target


# Carrying it out


def _scrub(text: str | None, needles: tuple[str, ...], replacement: str) -> str | None:
    if not text or not needles:
        return text
    # The JSON-escaped spelling too: json.dumps writes "é" as "\u00e9" by default.
    forms = {form for n in needles for form in (n, json.dumps(n)[1:-1])}
    pattern = re.compile("|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)),
                         re.IGNORECASE)
    return pattern.sub(replacement, text)


def _pseudonymise(session: Session, target: Target) -> None:
    for chunk in _chunks(target.audit):
        for event in session.exec(select(AuditEvent).where(col(AuditEvent.id).in_(chunk))):
            event.actor = _scrub(event.actor, target.needles, target.pseudonym) or ""
            detail = _scrub(event.detail, target.needles, target.pseudonym)
            if event.account_id == target.account_id or event.ticket_id in target.tickets:
                # The row it named goes: the event keeps whom it was about as the pseudonym.
                try:
                    data = json.loads(detail) if detail else {}
                except ValueError:
                    data = {"note": detail}
                data = data if isinstance(data, dict) else {"note": data}
                data["about"] = target.pseudonym
                detail = json.dumps(data, ensure_ascii=False)
                event.account_id = None
                if event.ticket_id in target.tickets:
                    event.ticket_id = None
            event.detail = detail
            session.add(event)


_KNOWN = {"account", "ticket", "message", "attachment", "inboundmail", "outbox", "auditevent"}


def _delete_dependents(session: Session, target: Target) -> None:
    """Rows of other tables that point at what goes (a rights request, say) go with it."""
    ids: dict[str, set[int]] = {
           "account": {target.account_id} if target.account_id is not None else set(),
           "ticket": target.tickets,
           "message": target.messages, "inboundmail": target.inbound, "outbox": target.outbox}
    for table in reversed(SQLModel.metadata.sorted_tables):
        if table.name in _KNOWN:
            continue
        for fk in table.foreign_keys:
            wanted = ids.get(fk.column.table.name)
            for chunk in _chunks(wanted or ()):
                session.execute(sa.delete(table).where(fk.parent.in_(chunk)))


def _delete_rows(session: Session, target: Target) -> None:
    if session.get_bind().dialect.name == "sqlite":
        # Deleted rows are overwritten with zeros rather than left in free pages.
        session.connection().exec_driver_sql("PRAGMA secure_delete = ON")
    _delete_dependents(session, target)
    _pseudonymise(session, target)
    # A mail that a remaining message still refers to stays (never happens, but a foreign key
    # error would stop the whole erasure).
    target.inbound -= _ids_in(session, Message.inbound_mail_id, Message.id,
                              _ids_in(session, Message.id, Message.inbound_mail_id, target.inbound)
                              - target.messages)
    for model, ids in ((Attachment, target.attachments), (Outbox, target.outbox),
                       (Message, target.messages), (InboundMail, target.inbound),
                       (Ticket, target.tickets), (Account, {target.account_id} - {None})):
        for chunk in _chunks(ids):
            session.execute(sa.delete(model).where(col(model.id).in_(chunk)))  # type: ignore[attr-defined]


def _inside(state_dir: Path, relative: str) -> Path | None:
    path = (state_dir / relative).resolve()
    return path if path.is_relative_to(state_dir.resolve()) else None


def delete_unreferenced(
    session: Session, state_dir: Path, raw_paths: set[str], digests: set[str]
) -> int:
    """Delete those files that no remaining row refers to; returns how many were deleted."""
    kept_raw = _ids_in(session, InboundMail.raw_path, InboundMail.raw_path, raw_paths)
    kept_files = _ids_in(session, Attachment.sha256, Attachment.sha256, digests)
    paths = [_inside(state_dir, p) for p in raw_paths - kept_raw]
    paths += [content_path(state_dir, ATTACHMENTS_DIR, d) for d in digests - kept_files]
    deleted = 0
    for path in paths:
        if path is not None and path.exists():
            path.unlink(missing_ok=True)
            deleted += 1
    return deleted


def finish_pending(settings: Settings, engine: sa.Engine) -> int:
    """Delete the files that a killed erasure left behind; returns how many were deleted."""
    state_dir = settings.desk.state_dir
    deleted = 0
    for journal in sorted((state_dir / PENDING_DIR).glob("*.json")):
        try:
            data = json.loads(journal.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            journal.unlink(missing_ok=True)
            continue
        with Session(engine) as session:
            deleted += delete_unreferenced(session, state_dir, set(data.get("raw", [])),
                                           set(data.get("attachments", [])))
        journal.unlink(missing_ok=True)
    for leftover in (state_dir / PENDING_DIR).glob(".tmp-*"):
        leftover.unlink(missing_ok=True)
    return deleted


def truncate_wal(engine: sa.Engine) -> bool:
    """On SQLite, copy the WAL into the database file and empty it; False if a reader held it."""
    if engine.dialect.name != "sqlite":
        return True
    with engine.connect() as connection:
        busy = connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()[0]
    return busy == 0


def execute(
    settings: Settings, engine: sa.Engine, target: Target, *, actor: str, action: str,
    now: datetime | None = None, hook: Hook | None = None,
) -> ErasureReport:
    """Carry out an erasure, in the order that a re-run after a kill completes."""
    report = ErasureReport(target.pseudonym, target.counts())
    state_dir = settings.desk.state_dir
    if target.copies and settings.imap.enabled:
        try:
            report.imap_deleted, report.imap_not_found = imap_copies.delete(
                settings.imap, target.copies)
        except (OSError, imap_copies.IMAPClientError) as exc:
            raise ErasureError(f"cannot reach the IMAP folders to erase the mails' copies "
                               f"({type(exc).__name__}); nothing was erased") from exc
    if hook:
        hook("imap")
    journal = state_dir / PENDING_DIR / f"{uuid.uuid4().hex}.json"
    write_once(journal, json.dumps({"raw": sorted(target.raw_paths),
                                    "attachments": sorted(target.digests)}).encode())
    with database.session_scope(engine) as session:
        _delete_rows(session, target)
        report.counts["inbound_mails"] = len(target.inbound)
        session.add(AuditEvent(
            actor=actor, action=action, at=now or utcnow(),
            detail=json.dumps({"about": target.pseudonym, **report.counts,
                               "imap_copies": report.imap_deleted}),
        ))
    if hook:
        hook("rows")
    with Session(engine) as session:
        report.files_deleted = delete_unreferenced(session, state_dir, target.raw_paths,
                                                   target.digests)
    journal.unlink(missing_ok=True)
    if hook:
        hook("files")
    report.wal_truncated = truncate_wal(engine)
    log.info("erased", action=action, about=target.pseudonym, files=report.files_deleted,
             imap=report.imap_deleted, **report.counts)
    return report


def erase_account(
    settings: Settings, engine: sa.Engine, email: str, *, actor: str,
    dry_run: bool = False, now: datetime | None = None, hook: Hook | None = None,
) -> ErasureReport:
    """Erase the account with that address and everything of theirs (ErasureError if none)."""
    finish_pending(settings, engine)
    with Session(engine) as session:
        account = session.exec(select(Account).where(
            Account.email == email.strip().lower())).first()
        if account is None:
            raise ErasureError(f"no account with email {email.strip()}")
        target = account_target(session, settings, account)
    if dry_run:
        return ErasureReport(target.pseudonym, target.counts(), dry_run=True)
    return execute(settings, engine, target, actor=actor, action="privacy.erase", now=now,
                   hook=hook)
