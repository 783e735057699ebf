"""The access log: each CLI read and each mail delivering ticket content is an audit event."""

from __future__ import annotations

import argparse
import json

import pytest
import sqlalchemy as sa
from e2e import AGENT, CUSTOMER, US_AGENT, customer_mail
from sqlmodel import Session, select

from maildesk.cli import main as cli_main
from maildesk.cli import tickets as cli_tickets
from maildesk.config import StoreSettings
from maildesk.mail.message import Delivery
from maildesk.pipeline import Pipeline
from maildesk.store import database, directory
from maildesk.store.access_log import DELIVERY, READ, operator, record_delivery
from maildesk.store.models import AuditEvent

SMTP = Delivery(source="smtp", envelope_from=CUSTOMER)


def _events(engine: sa.Engine, action: str) -> list[AuditEvent]:
    with Session(engine) as session:
        return list(session.exec(select(AuditEvent).where(AuditEvent.action == action)))


def test_showing_a_ticket_or_an_account_is_logged_with_the_reader(
    pipeline: Pipeline, engine: sa.Engine, capsys: pytest.CaptureFixture[str],
) -> None:
    ticket = pipeline.process(customer_mail().as_bytes(), SMTP).ticket_id
    url = engine.url.render_as_string(hide_password=False)
    settings = pipeline.settings.model_copy(update={"store": StoreSettings(url=url)})
    args = argparse.Namespace(ref=ticket, json=True, actor="cli:sam")
    assert cli_tickets.cmd_tickets_show(args, settings) == 0
    args = argparse.Namespace(email=CUSTOMER, json=True, actor="cli:sam",
                              as_agent=" Alice.Martin@vendor.example ")
    assert cli_main.cmd_accounts_show(args, settings) == 0
    shown = capsys.readouterr().out
    reads = _events(engine, READ)
    assert [(e.actor, e.ticket_id, json.loads(e.detail or "")["what"]) for e in reads] == [
        ("cli:sam", ticket, "ticket"), ("alice.martin@vendor.example", None, "account")]
    # Both reads count as reads of the customer's data; neither holds the ticket's text.
    assert reads[0].account_id == reads[1].account_id is not None
    assert "L'export PDF" in shown and all("export" not in (e.detail or "") for e in reads)


def test_a_ticket_that_does_not_exist_is_read_by_nobody(
    pipeline: Pipeline, engine: sa.Engine,
) -> None:
    url = engine.url.render_as_string(hide_password=False)
    settings = pipeline.settings.model_copy(update={"store": StoreSettings(url=url)})
    with pytest.raises(cli_tickets.NotFound):
        cli_tickets.cmd_tickets_show(argparse.Namespace(ref=99, json=True, actor="x"), settings)
    assert _events(engine, READ) == []


def test_a_delivery_names_the_agent_the_ticket_the_kind_and_the_region(
    pipeline: Pipeline, engine: sa.Engine,
) -> None:
    ticket = pipeline.process(customer_mail().as_bytes(), SMTP).ticket_id
    assert ticket is not None
    # The notifier recorded the EU agent's copy of the new ticket (the company has no
    # after-hours support, so the US agent got none).
    [notified] = _events(engine, DELIVERY)
    assert (notified.actor, notified.ticket_id) == (AGENT, ticket)
    assert json.loads(notified.detail or "") == {"kind": "new_ticket", "region": "eu"}
    with database.session_scope(engine) as session:
        agent = directory.find_agent(session, US_AGENT)
        assert agent is not None
        record_delivery(session, agent=agent, ticket_id=ticket, kind="new_ticket")
    [event] = [e for e in _events(engine, DELIVERY) if e.actor == US_AGENT]
    assert event.ticket_id == ticket
    assert json.loads(event.detail or "") == {"kind": "new_ticket", "region": "us"}
    assert event.account_id is not None


def test_the_reader_is_the_agent_given_else_the_os_user() -> None:
    assert operator(" Bob@X.example", "cli:root") == "bob@x.example"
    assert operator(None, "cli:root") == "cli:root"
    assert operator("", None) == "cli"
