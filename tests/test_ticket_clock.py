"""The ticket clock, on SQLite and PostgreSQL, with the clock moved: pending and solved tickets
close themselves, and the customer of a pending one is told."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path

import pytest
import sqlalchemy as sa
from e2e import CUSTOMER, DESK, seed
from outgoing import composed
from sqlmodel import Session, col, select

from maildesk.config import DeskSettings, SecuritySettings, Settings, TicketsSettings
from maildesk.lifecycle import close_due_tickets, run_ticket_clock
from maildesk.outbound.notify import Notifier
from maildesk.signing import load_reply_keys, principal_of_account, reply_address
from maildesk.store import database, directory, ticket_life
from maildesk.store.models import Account, AuditEvent, Message, Outbox, Ticket

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(desk=DeskSettings(address=DESK, state_dir=tmp_path / "state"),
                    security=SecuritySettings(reply_key="k"))  # type: ignore[arg-type]


@pytest.fixture
def desk(engine: sa.Engine) -> Iterator[sa.Engine]:
    seed(engine)
    yield engine


def _ticket_in(engine: sa.Engine, status: str, at: datetime = T0) -> int:
    with database.session_scope(engine) as session:
        account = directory.find_account(session, CUSTOMER)
        assert account is not None and account.id is not None
        ticket = Ticket(subject="Export PDF en erreur", account_id=account.id,
                        company_id=account.company_id)
        session.add(ticket)
        session.flush()
        session.add(Message(ticket_id=ticket.id, direction="in", author_kind="customer",  # type: ignore[arg-type]
                            author_email=CUSTOMER, text="Bonjour", created_at=at))
        if status != "open":
            ticket_life.set_status(session, ticket=ticket, status=status, actor="agent", now=at)
        assert ticket.id is not None
        return ticket.id


def _tick(engine: sa.Engine, settings: Settings, now: datetime) -> list[int]:
    notifier = Notifier(settings, load_reply_keys(settings))
    with database.session_scope(engine) as session:
        return close_due_tickets(session, settings=settings, notifier=notifier, now=now)


def _status(engine: sa.Engine, ticket_id: int) -> str:
    with Session(engine) as session:
        ticket = session.get(Ticket, ticket_id)
        assert ticket is not None
        return ticket.status


def _closing_notices(engine: sa.Engine) -> list[Outbox]:
    with Session(engine) as session:
        return list(session.exec(select(Outbox).where(Outbox.kind == "closed")))


def test_a_pending_ticket_closes_after_seven_days_and_the_customer_is_told(
    desk: sa.Engine, settings: Settings
) -> None:
    ticket_id = _ticket_in(desk, "pending")
    assert _tick(desk, settings, T0 + timedelta(days=6, hours=23)) == []
    assert _status(desk, ticket_id) == "pending" and _closing_notices(desk) == []

    assert _tick(desk, settings, T0 + timedelta(days=7)) == [ticket_id]
    assert _status(desk, ticket_id) == "closed"
    [notice] = _closing_notices(desk)
    assert (json.loads(notice.recipients), notice.automatic, notice.ticket_id) == (
        [CUSTOMER], True, ticket_id)
    mail = message_from_bytes(composed(notice), policy=policy.default)
    assert mail["Subject"] == f"[#{ticket_id}] Votre demande est clôturée"
    assert mail["Auto-Submitted"] == "auto-generated"
    text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "sans nouvelles de vous depuis 7 jours" in text and "dans les 14 jours" in text
    # A reply reopens the ticket: the notice carries the customer's own reply address.
    with Session(desk) as session:
        account = directory.find_account(session, CUSTOMER)
        assert account is not None and account.id is not None
        expected = reply_address(load_reply_keys(settings), DESK, ticket_id,
                                 principal_of_account(account.id))
    assert mail["Reply-To"].addresses[0].addr_spec == expected
    with Session(desk) as session:
        [event] = session.exec(select(AuditEvent).where(AuditEvent.action == "ticket.status",
                                                        AuditEvent.actor == "maildesk")).all()
    assert json.loads(event.detail or "{}") == {"from": "pending", "to": "closed",
                                                "reason": "no_answer: 7 days"}
    # Closed is closed: the next pass finds nothing more to do.
    assert _tick(desk, settings, T0 + timedelta(days=30)) == []
    assert len(_closing_notices(desk)) == 1


def test_a_solved_ticket_closes_after_three_days_without_a_mail(
    desk: sa.Engine, settings: Settings
) -> None:
    ticket_id = _ticket_in(desk, "solved")
    assert _tick(desk, settings, T0 + timedelta(days=3) - timedelta(seconds=1)) == []
    assert _tick(desk, settings, T0 + timedelta(days=3)) == [ticket_id]
    assert _status(desk, ticket_id) == "closed"
    assert _closing_notices(desk) == []


def test_the_days_come_from_the_tickets_section(desk: sa.Engine, tmp_path: Path) -> None:
    settings = Settings(desk=DeskSettings(address=DESK, state_dir=tmp_path / "state"),
                        security=SecuritySettings(reply_key="k"),  # type: ignore[arg-type]
                        tickets=TicketsSettings(pending_close_days=2, solved_close_days=1))
    pending, solved = _ticket_in(desk, "pending"), _ticket_in(desk, "solved")
    assert _tick(desk, settings, T0 + timedelta(days=1)) == [solved]
    assert _tick(desk, settings, T0 + timedelta(days=2)) == [pending]


def test_open_tickets_and_answered_pending_ones_stay(desk: sa.Engine, settings: Settings) -> None:
    open_id = _ticket_in(desk, "open")
    answered = _ticket_in(desk, "pending")
    with database.session_scope(desk) as session:
        # The customer answered, though nobody moved the ticket out of pending yet.
        session.add(Message(ticket_id=answered, direction="in", author_kind="customer",
                            author_email=CUSTOMER, text="Voici le fichier",
                            created_at=T0 + timedelta(days=1)))
    assert _tick(desk, settings, T0 + timedelta(days=60)) == []
    assert (_status(desk, open_id), _status(desk, answered)) == ("open", "pending")


def test_no_notice_to_a_deactivated_or_restricted_customer(
    desk: sa.Engine, settings: Settings
) -> None:
    first = _ticket_in(desk, "pending")
    with database.session_scope(desk) as session:
        account = session.exec(select(Account).where(Account.email == CUSTOMER)).one()
        account.restricted_at = T0
    assert _tick(desk, settings, T0 + timedelta(days=7)) == [first]
    with database.session_scope(desk) as session:
        account = session.exec(select(Account).where(Account.email == CUSTOMER)).one()
        account.restricted_at, account.deactivated_at = None, T0 + timedelta(days=8)
    second = _ticket_in(desk, "pending", at=T0 + timedelta(days=1))
    assert _tick(desk, settings, T0 + timedelta(days=9)) == [second]
    assert _closing_notices(desk) == []


def test_the_notice_stays_within_the_daily_limit_on_automatic_mail(
    desk: sa.Engine, tmp_path: Path
) -> None:
    from maildesk.config import LimitsSettings

    settings = Settings(desk=DeskSettings(address=DESK, state_dir=tmp_path / "state"),
                        security=SecuritySettings(reply_key="k"),  # type: ignore[arg-type]
                        limits=LimitsSettings(automatic_per_mailbox_per_day=1))
    refs = [_ticket_in(desk, "pending") for _ in range(3)]
    assert _tick(desk, settings, T0 + timedelta(days=7)) == refs
    # Every ticket closed, but the customer got one notice, not three, that day.
    assert len(_closing_notices(desk)) == 1


async def test_the_running_clock_closes_when_time_has_come_and_stops_when_told(
    desk: sa.Engine, settings: Settings
) -> None:
    ticket_id = _ticket_in(desk, "pending")
    # The first pass runs at 6 days 23 hours, every later one at 7 days.
    moments = [T0 + timedelta(days=6, hours=23)]
    seen: list[datetime] = []

    def clock() -> datetime:
        seen.append(moments[0] if not seen else T0 + timedelta(days=7))
        return seen[-1]

    stop = asyncio.Event()
    task = asyncio.create_task(run_ticket_clock(settings, desk, stop, clock=clock,
                                                interval=0.01))
    deadline = time.monotonic() + 30
    while _status(desk, ticket_id) != "closed":
        assert time.monotonic() < deadline, "the clock closed nothing"
        assert not task.done(), task
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 30)
    with Session(desk) as session:
        ticket = session.get(Ticket, ticket_id)
        assert ticket is not None
        # Closed by a pass at 7 days, not by the first one at 6 days 23 hours.
        assert ticket.status_changed_at == T0 + timedelta(days=7)
    assert len(seen) >= 2 and seen[0] == T0 + timedelta(days=6, hours=23)
    assert len(_closing_notices(desk)) == 1


async def test_the_clock_stops_at_once_while_it_waits(
    desk: sa.Engine, settings: Settings
) -> None:
    calls: list[datetime] = []
    stop = asyncio.Event()
    task = asyncio.create_task(run_ticket_clock(
        settings, desk, stop, clock=lambda: calls.append(T0) or T0, interval=3600))
    deadline = time.monotonic() + 30
    while not calls:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 30)
    assert calls == [T0]
    with Session(desk) as session:
        assert session.exec(select(Ticket).where(col(Ticket.status) == "closed")).all() == []
