"""The right of access: one zip with every personal-data item of one account.

`data.json` holds the account, its company, the source of the data, the retention dates, the
tickets with their whole threads (the person's messages and the answers they received), who
received their data (each mail to an agent, with the agent's region, and each read of their
data), and the index of the files; `attachments/` holds the attachments' files and `mails/` the
person's original mails as .eml. The format is documented in README.md ("Data export format").
Nothing of another account goes in beyond what was written into this person's tickets.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from maildesk.config import Settings
from maildesk.privacy import erase, retention
from maildesk.store import database
from maildesk.store.files import ATTACHMENTS_DIR, content_path
from maildesk.store.models import (
    Account,
    Agent,
    Attachment,
    AuditEvent,
    Company,
    InboundMail,
    Message,
    Outbox,
    Ticket,
    utcnow,
)

FORMAT = "maildesk-export/1"
EXPORT = "privacy.export"
# The kinds of outbox rows that carry ticket content to an agent.
_TO_AGENTS = ("new_ticket", "followup", "undeliverable")


class ExportError(Exception):
    """An export that could not be written; the message says why."""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^\w.\- ]", "_", name, flags=re.UNICODE).strip(" .") or "file"
    return cleaned[:100]


def _recipients(row: Outbox) -> list[str]:
    try:
        return [str(r).lower() for r in json.loads(row.recipients)]
    except (ValueError, TypeError):
        return []


class _Builder:
    """Collects the document and the files of one export."""

    def __init__(self, session: Session, settings: Settings, account: Account) -> None:
        self.session, self.settings, self.account = session, settings, account
        self.files: dict[str, bytes] = {}
        self.agents = {a.email.lower(): a for a in session.exec(select(Agent))}

    def _file(self, folder: str, name: str, data: bytes) -> str:
        path = f"{folder}/{name}"
        self.files[path] = data
        return path

    def _attachment(self, row: Attachment) -> dict[str, Any]:
        entry: dict[str, Any] = {"filename": row.filename, "content_type": row.content_type,
                                 "size": row.size, "file": None}
        path = content_path(self.settings.desk.state_dir, ATTACHMENTS_DIR, row.sha256)
        try:
            entry["file"] = self._file("attachments", f"{row.id}-{_safe_name(row.filename)}",
                                       path.read_bytes())
        except OSError:
            entry["missing"] = True
        return entry

    def _message(self, message: Message) -> dict[str, Any]:
        own = message.account_id == self.account.id
        attachments = self.session.exec(
            select(Attachment).where(Attachment.message_id == message.id).order_by(
                col(Attachment.id)))
        entry: dict[str, Any] = {
            "at": _iso(message.created_at),
            "from": "you" if own else message.author_kind,
            "author_name": message.author_name,
            # Agents write from the desk's address: theirs is not given out.
            "author_email": message.author_email if message.author_kind != "agent" else None,
            "text": message.text,
            "html": message.html,
            "attachments": [self._attachment(a) for a in attachments],
        }
        if own and message.inbound_mail_id is not None:
            entry["original_mail"] = self._mail(message.inbound_mail_id)
        return entry

    def _mail(self, inbound_id: int) -> str | None:
        inbound = self.session.get(InboundMail, inbound_id)
        if inbound is None:
            return None
        try:
            raw = (self.settings.desk.state_dir / inbound.raw_path).read_bytes()
        except OSError:
            return None
        return self._file("mails", f"{inbound.id}.eml", raw)

    def _ticket(self, ticket: Ticket) -> dict[str, Any]:
        messages = self.session.exec(
            select(Message).where(Message.ticket_id == ticket.id).order_by(col(Message.id)))
        return {"ref": ticket.id, "subject": ticket.subject, "status": ticket.status,
                "opened_at": _iso(ticket.created_at), "updated_at": _iso(ticket.updated_at),
                "messages": [self._message(m) for m in messages]}

    def _agent(self, address: str) -> dict[str, Any]:
        agent = self.agents.get(address)
        return {"name": agent.name if agent else None, "email": address,
                "region": agent.region if agent else None}

    def recipients(self, ticket_ids: set[int]) -> list[dict[str, Any]]:
        """Each mail that carried their data to an agent, and each access to their data."""
        received = []
        for ticket_id in sorted(ticket_ids):
            rows = self.session.exec(select(Outbox).where(Outbox.ticket_id == ticket_id)
                                     .order_by(col(Outbox.id)))
            for row in rows:
                for address in _recipients(row):
                    if address in self.agents:
                        received.append({"ticket": ticket_id, "kind": row.kind,
                                         "at": _iso(row.sent_at or row.created_at),
                                         "status": row.status, **self._agent(address)})
        return received

    def access_log(self, ticket_ids: set[int]) -> list[dict[str, Any]]:
        """The audit events about the account or its tickets: who did or saw what, when."""
        about = sa.or_(col(AuditEvent.account_id) == self.account.id,
                       col(AuditEvent.ticket_id).in_(ticket_ids or {0}))
        events = self.session.exec(select(AuditEvent).where(about).order_by(col(AuditEvent.id)))
        log = []
        for event in events:
            entry: dict[str, Any] = {"at": _iso(event.at), "actor": event.actor,
                                     "action": event.action, "ticket": event.ticket_id}
            agent = self.agents.get(event.actor.lower())
            if agent is not None:
                entry["region"] = agent.region
            try:
                detail = json.loads(event.detail) if event.detail else None
            except ValueError:
                detail = event.detail
            entry["detail"] = detail
            log.append(entry)
        return log

    def document(self, now: datetime) -> dict[str, Any]:
        """The whole data.json."""
        account, privacy = self.account, self.settings.privacy
        company = self.session.get(Company, account.company_id)
        tickets = list(self.session.exec(
            select(Ticket).where(Ticket.account_id == account.id).order_by(col(Ticket.id))))
        ticket_ids = {t.id for t in tickets if t.id is not None}
        elsewhere = self.session.exec(select(Message).where(
            Message.account_id == account.id, col(Message.ticket_id).not_in(ticket_ids or {0})))
        senders = erase.ticketless_senders(self.session, self.settings.desk.state_dir)
        held = [i for i, found in sorted(senders.items()) if account.email.lower() in found]
        due = retention.erase_after(account, self.settings)
        received = self.recipients(ticket_ids)
        return {
            "format": FORMAT,
            "exported_at": _iso(now),
            "controller": {"name": privacy.controller, "address": privacy.controller_address,
                           "dpo": privacy.dpo_email},
            "account": {"email": account.email, "name": account.name, "phone": account.phone,
                        "locale": account.locale, "created_at": _iso(account.created_at),
                        "deactivated_at": _iso(account.deactivated_at)},
            "company": company.name if company else None,
            "source": {"from": "your company",
                       "company": company.name if company else None,
                       "how": "your company gave your account's data when it asked for your "
                              "account; the rest was collected from your mails to the support"},
            "retention": {"years_after_deactivation": privacy.retention_years,
                          "deactivated_at": _iso(account.deactivated_at),
                          "erase_after": _iso(due),
                          "audit_events_days": privacy.audit_days},
            "tickets": [self._ticket(t) for t in tickets],
            "messages_in_other_tickets": [{"ticket": m.ticket_id, **self._message(m)}
                                          for m in elsewhere],
            "mails_on_no_ticket": [path for path in (self._mail(i) for i in held) if path],
            "recipients": received,
            "us_access": any(r["region"] == "us" for r in received),
            "access_log": self.access_log(ticket_ids),
            "files": sorted(self.files),
        }


def build_export(
    session: Session, settings: Settings, account: Account, now: datetime
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The export's data.json document and its files, by path inside the zip."""
    builder = _Builder(session, settings, account)
    document = builder.document(now)
    return document, builder.files


def write_export(
    settings: Settings, engine: sa.Engine, email: str, destination: Path, *, actor: str,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Write the export of the account with that address to `destination`; returns data.json."""
    now = now or utcnow()
    with database.session_scope(engine) as session:
        account = session.exec(select(Account).where(
            Account.email == email.strip().lower())).first()
        if account is None:
            raise ExportError(f"no account with email {email.strip()}")
        document, files = build_export(session, settings, account, now)
        _write_zip(destination, document, files)
        # The export is itself an access to the data: the log says who took a copy.
        session.add(AuditEvent(actor=actor, action=EXPORT, account_id=account.id, at=now,
                               detail=json.dumps({"tickets": len(document["tickets"]),
                                                  "files": len(files)})))
    return document


def _write_zip(destination: Path, document: dict[str, Any], files: dict[str, bytes]) -> None:
    """Write the zip next to `destination`, readable by its owner only, then move it there."""
    directory = destination.parent if str(destination.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".export-", suffix=".zip")
    except OSError as exc:
        raise ExportError(f"{destination}: cannot write: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle, zipfile.ZipFile(handle, "w",
                                                            zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("data.json", json.dumps(document, ensure_ascii=False, indent=2))
            for name, data in sorted(files.items()):
                archive.writestr(name, data)
        os.replace(tmp, destination)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ExportError(f"{destination}: cannot write: {exc.strerror}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
