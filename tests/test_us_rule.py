"""The US rule under 1,000 random steps: no US access to a company without after-hours support.

Each step flips the company's subscription at random, then does one thing: a customer opens a
ticket or follows one up (who is notified?), a US agent answers or sends a command through a
signed reply address (is it relayed or applied?), or the sender drains the outbox (does a mail
queued under the subscription still reach a US agent after it was dropped?). Every step checks
the rule against the subscription as it stands at that moment, and the positive cases are
checked too, so that a desk that never tells US agents anything would fail.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from e2e import CUSTOMER, DESK, US_AGENT, customer_mail
from sqlmodel import Session, select

from maildesk.mail.message import Delivery
from maildesk.outbound.send import OutboxSender
from maildesk.pipeline import Pipeline
from maildesk.signing import principal_of_agent, reply_address
from maildesk.store.database import session_scope
from maildesk.store.models import Agent, Company, Outbox, Ticket

STEPS = 1000
SMTP = Delivery(source="smtp", envelope_from=CUSTOMER, recipients=(DESK,))
NO_LIMITS = {"automatic_per_mailbox_per_day": 10**6, "breaker_tickets": 10**6}


def set_after_hours(engine: sa.Engine, value: bool) -> None:
    with session_scope(engine) as session:
        company = session.exec(select(Company)).one()
        company.after_hours = value
        session.add(company)


def outbox_after(engine: sa.Engine, last_id: int) -> list[Outbox]:
    with Session(engine) as session:
        return list(session.exec(select(Outbox).where(Outbox.id > last_id)))  # type: ignore[arg-type]


def to_us(row: Outbox) -> bool:
    """Whether the row carries a ticket's content to the US agent. The notice that their own
    mail was refused names only the ticket's number, and goes to them whatever the company."""
    return US_AGENT in json.loads(row.recipients) and row.kind != "agent_refused"


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_thousand_random_steps_never_give_a_us_agent_a_company_without_after_hours(
    pipeline: Pipeline, engine: sa.Engine, tmp_path: Path
) -> None:
    limits = pipeline.settings.limits.model_copy(update=NO_LIMITS)
    settings = pipeline.settings.model_copy(update={"limits": limits})
    pipeline.settings = pipeline.notices.settings = settings
    sender_settings = settings.model_copy(update={"smtp": settings.smtp.model_copy(
        update={"transport": "maildir", "maildir": tmp_path / "outgoing"})})
    sender = OutboxSender(sender_settings, engine)
    with Session(engine) as session:
        us_agent = session.exec(select(Agent).where(Agent.email == US_AGENT)).one()
    chaos = random.Random(10)  # A reproducible walk.
    seen: Counter[str] = Counter()
    seen_sent: set[int] = set()
    subscribed = False
    set_after_hours(engine, subscribed)
    pipeline.process(customer_mail(subject="Premier").as_bytes(), SMTP)
    for step in range(STEPS):
        if chaos.random() < 0.3:
            subscribed = not subscribed
            set_after_hours(engine, subscribed)
        with Session(engine) as session:
            tickets = [t.id for t in session.exec(select(Ticket))]
            last = session.exec(select(sa.func.max(Outbox.id))).one() or 0
        action = chaos.choice(["new", "follow-up", "answer", "command", "send"])
        where = f"step {step}: {action} with after-hours {'on' if subscribed else 'off'}"
        ticket_id = chaos.choice(tickets)
        if action in ("new", "follow-up"):
            subject = f"Demande {step}" if action == "new" else f"[#{ticket_id}] suite {step}"
            pipeline.process(customer_mail(subject=subject).as_bytes(), SMTP)
            told_us = any(to_us(r) for r in outbox_after(engine, last) if r.kind != "welcome")
            assert told_us == subscribed, where
        elif action in ("answer", "command"):
            address = reply_address(pipeline.reply_keys, DESK, ticket_id,
                                    principal_of_agent(us_agent.id))  # type: ignore[arg-type]
            with Session(engine) as session:
                before = session.get(Ticket, ticket_id).status  # type: ignore[union-attr]
            # A command that the ticket accepts, so that only the US rule can refuse it.
            command = "#open" if before == "closed" else "#close"
            text = f"{command}\n\nC'est réglé." if action == "command" else "Voici la réponse."
            mail = customer_mail(sender=US_AGENT, to=address, subject=f"Re: [#{ticket_id}]",
                                 text=text)  # fmt: skip
            outcome = pipeline.process(mail.as_bytes(), SMTP)
            with Session(engine) as session:
                after = session.get(Ticket, ticket_id).status  # type: ignore[union-attr]
            relayed = [r for r in outbox_after(engine, last) if r.kind == "answer"]
            if subscribed:
                assert outcome.outcome != "quarantined", where
            else:
                assert outcome.outcome == "quarantined", where
                assert not relayed and after == before, where
        else:
            sender.send_batch(limit=500)
            with Session(engine) as session:
                gone = session.exec(select(Outbox).where(Outbox.status == "sent")).all()
            fresh = [r for r in gone if r.id is not None and to_us(r)
                     and r.sent_at is not None and r.id not in seen_sent]  # fmt: skip
            # Whatever was queued while subscribed, a US agent gets it only while it still is.
            assert subscribed or not fresh, where
            seen_sent.update(r.id for r in gone if r.id is not None)
        seen[action] += 1
    # The walk went everywhere, both ways.
    assert min(seen.values()) >= 150, seen
    with Session(engine) as session:
        withheld = session.exec(
            select(Outbox).where(Outbox.status == "failed")
        ).all()
    assert any("withheld" in (r.last_error or "") for r in withheld), "no queued mail withheld"

