"""`[tickets] us_agents = "outside_office_hours"`: US agents hear only of the tickets that
arrive while the EU desk is closed, within the US rule, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from e2e import AGENT, DESK, US_AGENT, customer_mail, seed
from sqlmodel import Session, col, select

from maildesk.config import DeskSettings, SecuritySettings, Settings, TicketsSettings
from maildesk.mail.message import Delivery
from maildesk.pipeline import Pipeline
from maildesk.signing import principal_of_account, reply_address
from maildesk.store import database, directory, ticket_life
from maildesk.store.models import Agent, Outbox, Ticket

SMTP = Delivery(source="smtp", recipients=(DESK,))
# Monday 7 December 2026 in Paris (UTC+1): 10:00, and 20:00 once the desk has closed.
MONDAY_MORNING = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
MONDAY_EVENING = datetime(2026, 12, 7, 19, 0, tzinfo=UTC)
SATURDAY_MORNING = datetime(2026, 12, 12, 9, 0, tzinfo=UTC)


class Clock:
    """The time the pipeline files mail at, set by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def desk(engine: sa.Engine, tmp_path: Path, clock: Clock, *, us_agents: str,
         after_hours: bool = True) -> Pipeline:
    settings = Settings(
        desk=DeskSettings(address=DESK, state_dir=tmp_path / "state"),
        security=SecuritySettings(reply_key="k"),
        tickets=TicketsSettings(us_agents=us_agents),  # type: ignore[arg-type]
    )
    seed(engine, after_hours=after_hours)
    return Pipeline(settings, engine, clock=clock)


def told(engine: sa.Engine, kind: str) -> list[list[str]]:
    with Session(engine) as session:
        rows = session.exec(select(Outbox).where(Outbox.kind == kind)
                            .order_by(col(Outbox.id))).all()  # fmt: skip
        return [json.loads(row.recipients) for row in rows]


def new_ticket(pipeline: Pipeline, subject: str) -> int:
    ticket_id = pipeline.process(customer_mail(subject=subject).as_bytes(), SMTP).ticket_id
    assert ticket_id is not None
    return ticket_id


def test_us_agents_get_only_the_tickets_that_arrive_while_the_eu_desk_is_closed(
    engine: sa.Engine, tmp_path: Path
) -> None:
    clock = Clock(MONDAY_MORNING)
    pipeline = desk(engine, tmp_path, clock, us_agents="outside_office_hours")
    new_ticket(pipeline, "Le matin")
    clock.now = MONDAY_EVENING
    new_ticket(pipeline, "Le soir")
    clock.now = SATURDAY_MORNING
    new_ticket(pipeline, "Le samedi")
    assert told(engine, "new_ticket") == [[AGENT], [AGENT], [US_AGENT], [AGENT], [US_AGENT]]


def test_a_follow_up_goes_by_the_hour_its_ticket_arrived(
    engine: sa.Engine, tmp_path: Path
) -> None:
    clock = Clock(MONDAY_MORNING)
    pipeline = desk(engine, tmp_path, clock, us_agents="outside_office_hours")
    ticket_id = new_ticket(pipeline, "Le matin")
    # The customer's follow-up comes in the evening: the ticket is still the EU desk's.
    clock.now = MONDAY_EVENING
    address = reply_address(pipeline.reply_keys, DESK, ticket_id, principal_of_account(1))
    pipeline.process(customer_mail(to=address, subject="Re: Le matin").as_bytes(), SMTP)
    assert told(engine, "followup") == [[AGENT]]
    # Assigned to the US agent, the ticket's news reach them whatever the hour.
    with database.session_scope(engine) as session:
        ticket = session.get(Ticket, ticket_id)
        bob = directory.find_agent(session, US_AGENT)
        assert ticket is not None and isinstance(bob, Agent)
        ticket_life.assign(session, ticket=ticket, agent=bob, actor="test")
    pipeline.process(customer_mail(to=address, subject="Re: Le matin", text="Encore.").as_bytes(),
                     SMTP)  # fmt: skip
    assert told(engine, "followup") == [[AGENT], [US_AGENT]]


@pytest.mark.parametrize("moment", [MONDAY_MORNING, MONDAY_EVENING])
def test_by_default_us_agents_get_every_ticket_of_a_subscribed_company(
    engine: sa.Engine, tmp_path: Path, moment: datetime
) -> None:
    pipeline = desk(engine, tmp_path, Clock(moment), us_agents="always")
    new_ticket(pipeline, "Bonjour")
    assert told(engine, "new_ticket") == [[AGENT], [US_AGENT]]


def test_the_hours_never_open_a_company_without_after_hours_support_to_the_us(
    engine: sa.Engine, tmp_path: Path
) -> None:
    pipeline = desk(engine, tmp_path, Clock(SATURDAY_MORNING), us_agents="outside_office_hours",
                    after_hours=False)
    new_ticket(pipeline, "Le samedi")
    assert told(engine, "new_ticket") == [[AGENT]]
