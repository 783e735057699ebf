"""Rights requests by mail: marked with their due date, copied to the DPO, listed until closed."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from email import message_from_bytes, policy

import pytest
import sqlalchemy as sa
from e2e import CUSTOMER, customer_mail
from outgoing import composed
from sqlmodel import Session, select
from support_fixtures import Desk

from maildesk.mail.message import Delivery
from maildesk.pipeline import Pipeline
from maildesk.privacy import requests
from maildesk.store import database
from maildesk.store.models import Account, AuditEvent, Message, Outbox, RightsRequest, Ticket

SMTP = Delivery(source="smtp", envelope_from=CUSTOMER)
DPO = "dpo@neocasesoftware.com"


def _file(pipeline: Pipeline, subject: str, text: str) -> int:
    """File a mail, and take back what the pipeline's own check marked, so that `_check` can
    replay that check at a chosen time."""
    ticket_id = pipeline.process(customer_mail(subject=subject, text=text).as_bytes(),
                                 SMTP).ticket_id
    assert ticket_id is not None
    with database.session_scope(pipeline.engine) as session:
        for request in session.exec(select(RightsRequest).where(
                RightsRequest.ticket_id == ticket_id)):  # fmt: skip
            session.delete(request)
        for copy in session.exec(select(Outbox).where(Outbox.kind == "dpo_rights_request")):
            session.delete(copy)
        for event in session.exec(select(AuditEvent).where(
                AuditEvent.action == "privacy.request")):  # fmt: skip
            session.delete(event)
    return ticket_id


def test_the_pipeline_marks_a_request_that_comes_by_mail(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    outcome = pipeline.process(customer_mail(
        subject="Demande RGPD", text="Merci de supprimer mes données personnelles.").as_bytes(),
        SMTP)  # fmt: skip
    with Session(engine) as session:
        [request] = session.exec(select(RightsRequest)).all()
        copies = session.exec(select(Outbox).where(Outbox.kind == "dpo_rights_request")).all()
    assert (request.ticket_id, request.kind) == (outcome.ticket_id, "erasure")
    assert [json.loads(c.recipients) for c in copies] == [[DPO]]


def _check(pipeline: Pipeline, engine: sa.Engine, ticket_id: int, subject: str,
           received_at: datetime) -> int | None:
    """What the pipeline does after storing a customer's mail: check it for a request."""
    with database.session_scope(engine) as session:
        ticket = session.get(Ticket, ticket_id)
        assert ticket is not None
        account = session.get(Account, ticket.account_id)
        message = session.exec(select(Message).where(Message.ticket_id == ticket_id)).first()
        assert account is not None and message is not None
        marked = requests.check_mail(session, ticket=ticket, account=account, message=message,
                                     subject=subject, received_at=received_at,
                                     notifier=pipeline.notifier)
        return marked.id if marked is not None else None


@pytest.mark.parametrize(("received_at", "due"), [
    (datetime(2027, 1, 31, 10, 0, tzinfo=UTC), date(2027, 2, 28)),
    (datetime(2028, 1, 31, 10, 0, tzinfo=UTC), date(2028, 2, 29)),
    # 23:30 UTC on 31 January is already 1 February in Paris.
    (datetime(2027, 1, 31, 23, 30, tzinfo=UTC), date(2027, 3, 1)),
])
def test_a_request_of_31_january_is_due_on_the_last_day_of_february(
    pipeline: Pipeline, engine: sa.Engine, received_at: datetime, due: date
) -> None:
    subject = "Demande RGPD"
    ticket_id = _file(pipeline, subject, "Merci de supprimer mes données personnelles.")
    request_id = _check(pipeline, engine, ticket_id, subject, received_at)
    with Session(engine) as session:
        request = session.get(RightsRequest, request_id)
        assert request is not None
        assert (request.kind, request.due_on, request.ticket_id) == ("erasure", due, ticket_id)


def test_the_dpo_gets_a_copy_and_an_ordinary_mail_is_not_marked(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    ordinary = _file(pipeline, "Fichier", "Comment supprimer le fichier importé par erreur ?")
    assert _check(pipeline, engine, ordinary, "Fichier", datetime.now(UTC)) is None
    asked = _file(pipeline, "Mes données", "Pouvez-vous m'envoyer une copie de mes données ?")
    request_id = _check(pipeline, engine, asked, "Mes données", datetime.now(UTC))
    assert request_id is not None
    # The same request repeated in a follow-up does not restart the clock.
    assert _check(pipeline, engine, asked, "Re: Mes données", datetime.now(UTC)) is None
    with Session(engine) as session:
        copies = session.exec(select(Outbox).where(Outbox.kind == "dpo_rights_request")).all()
        assert [json.loads(c.recipients) for c in copies] == [[DPO]]
        assert copies[0].ticket_id == asked
        marked = session.exec(select(AuditEvent).where(
            AuditEvent.action == "privacy.request")).one()
        assert marked.ticket_id == asked and "copie de mes" not in (marked.detail or "")
    copy = message_from_bytes(composed(copies[0]), policy=policy.default)
    assert f"[#{asked}]" in copy["Subject"] and "droit d'accès" in copy["Subject"]
    text = copy.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Pouvez-vous m'envoyer une copie de mes données ?" in text
    assert CUSTOMER in text and copy["Reply-To"] is None


def test_open_requests_come_overdue_first_and_leave_when_closed(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    late = _file(pipeline, "RGPD", "Je m'oppose au traitement de mes données.")
    recent = _file(pipeline, "GDPR", "Please erase my data.")
    older = _file(pipeline, "Accès", "Je veux exercer mon droit d'accès (RGPD).")
    _check(pipeline, engine, recent, "GDPR", datetime(2027, 3, 10, tzinfo=UTC))
    late_id = _check(pipeline, engine, late, "RGPD", datetime(2027, 1, 5, tzinfo=UTC))
    _check(pipeline, engine, older, "Accès", datetime(2027, 2, 1, tzinfo=UTC))
    with database.session_scope(engine) as session:
        listed = requests.open_requests(session, today=date(2027, 2, 20))
        assert [(r.ticket.id if r.ticket else None, r.overdue) for r in listed] == [
            (late, True), (older, False), (recent, False)]
        assert late_id is not None
        requests.close_request(session, request_id=late_id, actor="cli:dpo")
        with pytest.raises(requests.RequestError, match="was closed on"):
            requests.close_request(session, request_id=late_id, actor="cli:dpo")
        with pytest.raises(requests.RequestError, match="no rights request #999"):
            requests.close_request(session, request_id=999, actor="cli:dpo")
    with database.session_scope(engine) as session:
        assert [r.ticket.id if r.ticket else None
                for r in requests.open_requests(session, today=date(2027, 2, 20))] == [
            older, recent]


def test_the_requests_commands(desk: Desk) -> None:
    assert desk.cli("companies", "add", "Client SA").code == 0
    assert desk.cli("accounts", "add", "--email", CUSTOMER, "--name", "Claire",
                    "--company", "Client SA").code == 0
    assert desk.cli("privacy", "object", CUSTOMER).code == 0
    listed = json.loads(desk.cli("privacy", "requests", "--json").out)
    assert [(r["id"], r["kind"], r["ticket"], r["account"], r["overdue"]) for r in listed] == [
        (1, "objection", 1, CUSTOMER, False)]
    table = desk.cli("privacy", "requests").out.splitlines()
    assert table[0].split() == ["ID", "KIND", "TICKET", "ACCOUNT", "DUE_ON", "OVERDUE"]
    assert desk.cli("privacy", "close-request", "1").out.strip() == (
        "rights request #1 (objection) closed")
    closed = desk.cli("privacy", "close-request", "1")
    assert closed.code == 1 and "was closed on" in closed.err
    assert json.loads(desk.cli("privacy", "requests", "--json").out) == []
