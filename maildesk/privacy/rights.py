"""The rights a person exercises through the DPO: restriction, objection, post-mortem directives.

Each change writes an audit event. Restriction (Art. 18) keeps the data but stops their
processing: the pipeline asks `is_restricted` and then stores a restricted person's new mail
without notifying any agent, and lets nothing of theirs reach US staff. An objection (Art. 21)
is recorded and opens a ticket for the DPO, who decides. A post-mortem directive (French law,
Informatique et Libertés art. 85) says what happens to the data once the person has died, and
`carry_out_directive` does it.

An export for a deceased person's heir is never mailed: a zip of someone's support history
sent to an address that nobody verified could go to anyone. The file is written to the state
directory, the designated address is told that the DPO will contact them, and the DPO is told
where the file is, so that a person checks the heir's identity and hands the file over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from maildesk.config import Settings
from maildesk.outbound.notify import Notifier
from maildesk.privacy.requests import local_day
from maildesk.rules.rights import due_date
from maildesk.store import database, directory
from maildesk.store.directory import DirectoryError, get_account, normalise_email
from maildesk.store.models import (
    Account,
    AuditEvent,
    Company,
    Message,
    RightsRequest,
    Ticket,
    utcnow,
)

DIRECTIVES = ("keep", "erase", "export-to")
EXPORTS_DIR = "exports"


def is_restricted(account: Account) -> bool:
    """Whether the account's data are under restriction: kept, but not processed."""
    return account.restricted_at is not None


def _audit(session: Session, actor: str, action: str, account: Account, **detail: Any) -> None:
    session.add(AuditEvent(
        actor=actor, action=action, account_id=account.id,
        detail=json.dumps(detail, ensure_ascii=False) if detail else None,
    ))


def restrict(session: Session, *, email: str, actor: str) -> Account:
    """Put the account's data under restriction (DirectoryError if it already is)."""
    account = get_account(session, email)
    if account.restricted_at is not None:
        raise DirectoryError(f"the account {account.email} is already restricted (since "
                             f"{account.restricted_at.date().isoformat()})")
    account.restricted_at = utcnow()
    session.add(account)
    _audit(session, actor, "privacy.restrict", account)
    return account


def unrestrict(session: Session, *, email: str, actor: str) -> Account:
    """Lift the restriction of the account's data (DirectoryError if there is none)."""
    account = get_account(session, email)
    if account.restricted_at is None:
        raise DirectoryError(f"the account {account.email} is not restricted")
    account.restricted_at = None
    session.add(account)
    _audit(session, actor, "privacy.unrestrict", account)
    return account


@dataclass(frozen=True)
class Objection:
    """What recording an objection did: the ticket for the DPO and its request."""

    account: Account
    ticket: Ticket
    request: RightsRequest


def record_objection(
    session: Session, notifier: Notifier, *, email: str, actor: str,
    now: datetime | None = None,
) -> Objection:
    """Record the person's objection and open a ticket on their account for the DPO."""
    settings = notifier.settings
    now = now or utcnow()
    account = get_account(session, email)
    company = session.get(Company, account.company_id)
    if company is None:
        raise DirectoryError(f"the account {account.email} has no company")
    if account.objected_at is None:
        account.objected_at = now
    session.add(account)
    locale = settings.desk.locale
    context = {"account": account, "company": company, "actor": actor,
               "privacy": settings.privacy, "desk": settings.desk}
    subject = notifier.env.get_template(f"{locale}/objection_ticket.subject.j2").render(context)
    ticket = Ticket(subject=" ".join(subject.split()), account_id=account.id,  # type: ignore[arg-type]
                    company_id=account.company_id)
    session.add(ticket)
    session.flush()
    text = notifier.env.get_template(f"{locale}/objection_ticket.txt.j2").render(context)
    session.add(Message(ticket_id=ticket.id, direction="in",  # type: ignore[arg-type]
                        author_kind="maildesk", author_email=settings.desk.address,
                        author_name=settings.desk.name[:200], text=text.strip() + "\n"))
    request = RightsRequest(ticket_id=ticket.id, account_id=account.id, kind="objection",
                            received_at=now, due_on=due_date(local_day(settings, now)))
    session.add(request)
    session.flush()
    session.add(AuditEvent(actor=actor, action="ticket.open", ticket_id=ticket.id,
                           account_id=account.id))
    session.add(AuditEvent(actor=actor, action="privacy.object", ticket_id=ticket.id,
                           account_id=account.id,
                           detail=json.dumps({"request": request.id})))
    notifier.compose(
        session, "dpo_objection", to_name="", to_address=settings.privacy.dpo_email,
        locale=locale, ticket=ticket, account=account, company=company, actor=actor,
        request=request,
    )
    return Objection(account, ticket, request)


def set_directive(
    session: Session, *, email: str, directive: str, address: str | None, actor: str
) -> Account:
    """Record the person's post-mortem directive: keep, erase, or export-to an address."""
    account = get_account(session, email)
    if directive not in DIRECTIVES:
        raise DirectoryError(f'a directive is one of {", ".join(DIRECTIVES)}, not "{directive}"')
    if directive == "export-to":
        if not address:
            raise DirectoryError("export-to needs the address to hand the data to")
        address = normalise_email(address)
    elif address:
        raise DirectoryError(f"{directive} takes no address")
    account.directive = directive
    account.directive_address = address if directive == "export-to" else None
    session.add(account)
    # The heir's address is personal data of someone else: the audit names the directive only.
    _audit(session, actor, "privacy.directive", account, directive=directive)
    return account


@dataclass(frozen=True)
class DirectiveOutcome:
    """What `carry_out_directive` did."""

    directive: str
    export_path: Path | None = None
    erased: bool = False


def carry_out_directive(
    settings: Settings, engine: sa.Engine, notifier: Notifier, *, email: str, actor: str,
    now: datetime | None = None,
) -> DirectiveOutcome:
    """Record the person's death and carry out their directive (none recorded: keep).

    keep: the account is deactivated and its data follow the retention rules. erase: the
    account is erased at once, as by `privacy erase`. export-to: the export is written to
    state_dir/exports, the designated address is told that the DPO will hand it over, and the
    DPO is told where it is; the account is deactivated.
    """
    now = now or utcnow()
    with database.session_scope(engine) as session:
        account = get_account(session, email)
        directive = account.directive or "keep"
        address = account.directive_address
        address_of_account = account.email
    if directive == "erase":
        with database.session_scope(engine) as session:
            _record_death(session, get_account(session, address_of_account), actor, now, "erase")
        # Imported here: the erasure is the other half of the privacy package, and the
        # rights commands load without it.
        from maildesk.privacy.erase import erase_account

        erase_account(settings, engine, address_of_account, actor=actor, now=now)
        return DirectiveOutcome("erase", erased=True)
    path: Path | None = None
    if directive == "export-to":
        from maildesk.privacy.export import write_export

        with database.session_scope(engine) as session:
            account_id = get_account(session, address_of_account).id
        path = (settings.desk.state_dir / EXPORTS_DIR
                / f"deceased-{account_id}-{now.strftime('%Y%m%d%H%M%S')}.zip")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_export(settings, engine, address_of_account, path, actor=actor, now=now)
    with database.session_scope(engine) as session:
        account = get_account(session, address_of_account)
        _record_death(session, account, actor, now, directive)
        if path is not None and address is not None:
            company = session.get(Company, account.company_id)
            notifier.compose(session, "directive_export", to_name="", to_address=address,
                             locale=account.locale, account=account)
            notifier.compose(session, "dpo_directive_export", to_name="",
                             to_address=settings.privacy.dpo_email, locale=settings.desk.locale,
                             account=account, company=company, actor=actor, address=address,
                             path=str(path))
    return DirectiveOutcome(directive, export_path=path)


def _record_death(
    session: Session, account: Account, actor: str, now: datetime, directive: str
) -> None:
    if account.deceased_at is None:
        account.deceased_at = now
    session.add(account)
    _audit(session, actor, "privacy.deceased", account, directive=directive)
    directory.deactivate_account(session, email=account.email, on=now, actor=actor)
