"""Rights requests: recorded with their due date, copied to the DPO, listed until closed.

A customer's mail that asks to exercise a right (rules/rights.py decides) is marked by the
pipeline after the ticket or follow-up is stored, in the same transaction: the request, its
due date one month later (Art. 12(3)) and the copy to the DPO commit with the mail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

from sqlmodel import Session, col, select

from maildesk.config import Settings
from maildesk.outbound.notify import Notifier
from maildesk.rules.rights import KINDS, due_date, rights_request
from maildesk.store.models import (
    Account,
    AuditEvent,
    Company,
    Message,
    RightsRequest,
    Ticket,
    utcnow,
)

MARKED = "privacy.request"
CLOSED = "privacy.request.close"
DPO_KIND = "dpo_rights_request"


class RequestError(Exception):
    """A request that cannot be closed; the message says why."""


def local_day(settings: Settings, moment: datetime) -> date:
    """The day that `moment` falls on in the desk's time zone."""
    return moment.astimezone(ZoneInfo(settings.desk.timezone)).date()


def mark_rights_request(
    session: Session, *, ticket: Ticket, account: Account, kind: str, received_at: datetime,
    notifier: Notifier, message: Message | None = None, subject: str = "",
) -> RightsRequest | None:
    """Record a rights request on `ticket` and queue a copy of `message` to the DPO.

    None when the ticket already has an open request of that kind: a follow-up that repeats
    the request does not restart its clock.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind of rights request: {kind}")
    already = session.exec(select(RightsRequest.id).where(
        RightsRequest.ticket_id == ticket.id, RightsRequest.kind == kind,
        col(RightsRequest.closed_at).is_(None),
    )).first()
    if already is not None:
        return None
    settings = notifier.settings
    received_on = local_day(settings, received_at)
    request = RightsRequest(ticket_id=ticket.id, account_id=account.id, kind=kind,
                            received_at=received_at, due_on=due_date(received_on))
    session.add(request)
    session.flush()
    session.add(AuditEvent(
        actor=account.email, action=MARKED, ticket_id=ticket.id, account_id=account.id,
        detail=json.dumps({"request": request.id, "kind": kind,
                           "due_on": request.due_on.isoformat()}),
    ))
    company = session.get(Company, account.company_id)
    notifier.compose(
        session, DPO_KIND, to_name="", to_address=settings.privacy.dpo_email,
        locale=settings.desk.locale, ticket=ticket, request=request, account=account,
        company=company, received_on=received_on, subject=subject or ticket.subject,
        message=message or Message(ticket_id=ticket.id or 0, direction="in",
                                   author_kind="customer", author_email=account.email),
    )
    return request


def check_mail(
    session: Session, *, ticket: Ticket, account: Account, message: Message, subject: str,
    received_at: datetime, notifier: Notifier,
) -> RightsRequest | None:
    """Mark `message` as a rights request if it asks to exercise a right; else None."""
    kind = rights_request(subject, message.text)
    if kind is None:
        return None
    return mark_rights_request(
        session, ticket=ticket, account=account, kind=kind, received_at=received_at,
        notifier=notifier, message=message, subject=subject,
    )


@dataclass(frozen=True)
class OpenRequest:
    """An open rights request, with whose it is and whether its due date has passed."""

    request: RightsRequest
    account: Account | None
    ticket: Ticket | None
    overdue: bool


def open_requests(session: Session, today: date | None = None) -> list[OpenRequest]:
    """The requests not closed yet, overdue first, then by due date."""
    today = today or utcnow().date()
    rows = session.exec(
        select(RightsRequest).where(col(RightsRequest.closed_at).is_(None))
        .order_by(col(RightsRequest.due_on), col(RightsRequest.id))
    ).all()
    found = [
        OpenRequest(
            row,
            session.get(Account, row.account_id) if row.account_id is not None else None,
            session.get(Ticket, row.ticket_id) if row.ticket_id is not None else None,
            row.due_on < today,
        )
        for row in rows
    ]
    # Sorted by due date, the overdue ones come first already; the sort says it outright.
    return sorted(found, key=lambda r: (not r.overdue, r.request.due_on, r.request.id or 0))


def close_request(session: Session, *, request_id: int, actor: str) -> RightsRequest:
    """Mark a request as answered."""
    request = session.get(RightsRequest, request_id)
    if request is None:
        raise RequestError(f"no rights request #{request_id}")
    if request.closed_at is not None:
        raise RequestError(f"rights request #{request_id} was closed on "
                           f"{request.closed_at.date().isoformat()}")
    request.closed_at = utcnow()
    session.add(request)
    session.add(AuditEvent(actor=actor, action=CLOSED, ticket_id=request.ticket_id,
                           account_id=request.account_id,
                           detail=json.dumps({"request": request.id, "kind": request.kind})))
    return request
