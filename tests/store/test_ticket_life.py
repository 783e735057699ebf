"""A ticket's life in the store, on SQLite and PostgreSQL: each change, its refusal, its audit."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from e2e import AGENT, COLLEAGUE, CUSTOMER, US_AGENT, seed
from sqlmodel import Session, col, select

from maildesk.store import database, directory, ticket_life
from maildesk.store.models import (
    Agent,
    Attachment,
    AuditEvent,
    Company,
    Message,
    Ticket,
    TicketWatcher,
)
from maildesk.store.ticket_life import TicketActionError

NOW = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


def _ticket(session: Session, subject: str = "Export PDF en erreur", email: str = CUSTOMER,
            texts: tuple[str, ...] = ("Bonjour",)) -> Ticket:
    account = directory.find_account(session, email)
    assert account is not None and account.id is not None
    ticket = Ticket(subject=subject, account_id=account.id, company_id=account.company_id)
    session.add(ticket)
    session.flush()
    assert ticket.id is not None
    for text in texts:
        session.add(Message(ticket_id=ticket.id, direction="in", author_kind="customer",
                            author_email=email, text=text, account_id=account.id))
    session.flush()
    return ticket


def _agent(session: Session, email: str) -> Agent:
    agent = directory.find_agent(session, email)
    assert agent is not None
    return agent


def _events(session: Session, action: str) -> list[tuple[str, int | None, dict[str, object]]]:
    rows = session.exec(select(AuditEvent).where(AuditEvent.action == action)
                        .order_by(col(AuditEvent.id))).all()
    return [(e.actor, e.ticket_id, json.loads(e.detail or "{}")) for e in rows]


@pytest.fixture
def session(engine: sa.Engine) -> Session:
    seed(engine)
    with database.session_scope(engine) as session:
        yield session  # type: ignore[misc]


def test_status_changes_are_recorded_with_their_clock(session: Session) -> None:
    ticket = _ticket(session)
    ticket_life.set_status(session, ticket=ticket, status="pending", actor=AGENT, now=NOW)
    assert (ticket.status, ticket.status_changed_at) == ("pending", NOW)
    later = NOW + timedelta(hours=2)
    ticket_life.set_status(session, ticket=ticket, status="closed", actor="maildesk", now=later,
                           reason="no_answer: 7 days")
    ticket_life.reopen(session, ticket=ticket, actor=AGENT, now=later + timedelta(hours=1))
    assert (ticket.status, ticket.status_changed_at) == ("open", later + timedelta(hours=1))
    assert _events(session, "ticket.status") == [
        (AGENT, ticket.id, {"from": "open", "to": "pending"}),
        ("maildesk", ticket.id, {"from": "pending", "to": "closed",
                                 "reason": "no_answer: 7 days"}),
    ]
    assert _events(session, "ticket.reopen") == [
        (AGENT, ticket.id, {"from": "closed", "to": "open"})
    ]
    # The audit event counts as being about the requester, for their export.
    event = session.exec(select(AuditEvent).where(AuditEvent.action == "ticket.reopen")).one()
    assert event.account_id == ticket.account_id


def test_status_refusals_change_nothing(session: Session) -> None:
    ticket = _ticket(session)
    with pytest.raises(TicketActionError, match=r"^ticket #\d+ is already open$"):
        ticket_life.set_status(session, ticket=ticket, status="open", actor=AGENT)
    with pytest.raises(TicketActionError, match='status must be one of open, pending, solved, '
                                                'closed, not "answered"'):
        ticket_life.set_status(session, ticket=ticket, status="answered", actor=AGENT)
    with pytest.raises(TicketActionError, match="is open, not solved or closed"):
        ticket_life.reopen(session, ticket=ticket, actor=AGENT)
    assert (ticket.status, ticket.status_changed_at) == ("open", None)
    assert _events(session, "ticket.status") == []


def test_assign_and_unassign(session: Session) -> None:
    ticket = _ticket(session)
    alice = _agent(session, AGENT)
    ticket_life.assign(session, ticket=ticket, agent=alice, actor=AGENT)
    assert ticket.assignee_id == alice.id
    with pytest.raises(TicketActionError, match=f"already assigned to {AGENT}"):
        ticket_life.assign(session, ticket=ticket, agent=alice, actor=AGENT)
    ticket_life.assign(session, ticket=ticket, agent=None, actor="cli:ops")
    assert ticket.assignee_id is None
    assert _events(session, "ticket.assign") == [
        (AGENT, ticket.id, {"from": None, "to": AGENT}),
        ("cli:ops", ticket.id, {"from": AGENT, "to": None}),
    ]


def test_us_staff_are_refused_without_after_hours_and_taken_with_it(session: Session) -> None:
    ticket = _ticket(session)
    bob = _agent(session, US_AGENT)
    refusal = "is in the US team and the company of ticket #.* has no after-hours support"
    with pytest.raises(TicketActionError, match=refusal):
        ticket_life.assign(session, ticket=ticket, agent=bob, actor=US_AGENT)
    with pytest.raises(TicketActionError, match=refusal):
        ticket_life.watch(session, ticket=ticket, agent=bob, actor=US_AGENT)
    with pytest.raises(TicketActionError, match=refusal):
        ticket_life.add_note(session, ticket=ticket, agent=bob, text="x", actor=US_AGENT)
    assert ticket.assignee_id is None and _events(session, "ticket.assign") == []
    company = session.get(Company, ticket.company_id)
    assert company is not None
    company.after_hours = True
    ticket_life.assign(session, ticket=ticket, agent=bob, actor=US_AGENT)
    assert ticket.assignee_id == bob.id


def test_an_inactive_agent_is_refused(session: Session) -> None:
    ticket = _ticket(session)
    alice = directory.deactivate_agent(session, email=AGENT, actor="test")
    with pytest.raises(TicketActionError, match=f"agent {AGENT} is inactive"):
        ticket_life.assign(session, ticket=ticket, agent=alice, actor="cli:ops")


def test_priority(session: Session) -> None:
    ticket = _ticket(session)
    assert ticket.priority == "normal"
    ticket_life.set_priority(session, ticket=ticket, priority="urgent", actor=AGENT)
    with pytest.raises(TicketActionError, match="already of urgent priority"):
        ticket_life.set_priority(session, ticket=ticket, priority="urgent", actor=AGENT)
    with pytest.raises(TicketActionError, match='not "critical"'):
        ticket_life.set_priority(session, ticket=ticket, priority="critical", actor=AGENT)
    assert _events(session, "ticket.priority") == [
        (AGENT, ticket.id, {"from": "normal", "to": "urgent"})
    ]


def test_watch_once(session: Session) -> None:
    ticket = _ticket(session)
    alice = _agent(session, AGENT)
    ticket_life.watch(session, ticket=ticket, agent=alice, actor=AGENT)
    with pytest.raises(TicketActionError, match=f"{AGENT} already watches"):
        ticket_life.watch(session, ticket=ticket, agent=alice, actor=AGENT)
    assert [a.email for a in ticket_life.watchers(session, ticket.id)] == [AGENT]
    assert _events(session, "ticket.watch") == [(AGENT, ticket.id, {"agent": AGENT})]


def test_a_note_is_internal_and_its_text_stays_out_of_the_audit(session: Session) -> None:
    ticket = _ticket(session)
    note = ticket_life.add_note(session, ticket=ticket, agent=_agent(session, AGENT),
                                text="Client VIP : rappeler avant midi.", actor=AGENT)
    stored = session.get(Message, note.id)
    assert stored is not None
    assert (stored.internal, stored.author_kind, stored.author_email, stored.ticket_id) == (
        True, "agent", AGENT, ticket.id)
    [(actor, ticket_id, detail)] = _events(session, "ticket.note")
    assert (actor, ticket_id, detail) == (AGENT, ticket.id, {"message": note.id})
    with pytest.raises(TicketActionError, match="the note is empty"):
        ticket_life.add_note(session, ticket=ticket, agent=_agent(session, AGENT), text=" \n",
                             actor=AGENT)


def test_merge_moves_the_thread_and_closes_the_source(session: Session) -> None:
    target = _ticket(session, texts=("premier",))
    source = _ticket(session, subject="Toujours l'export", email=COLLEAGUE,
                     texts=("deuxième", "troisième"))
    first = session.exec(select(Message).where(Message.ticket_id == source.id)).first()
    assert first is not None and first.id is not None
    session.add(Attachment(message_id=first.id, sha256="0" * 64, filename="log.txt",
                           content_type="text/plain", size=3))
    alice = _agent(session, AGENT)
    ticket_life.watch(session, ticket=source, agent=alice, actor=AGENT)

    moved = ticket_life.merge(session, source=source, target=target, actor=AGENT, now=NOW)

    assert moved == 2
    texts = session.exec(select(Message.text).where(Message.ticket_id == target.id)
                         .order_by(col(Message.id))).all()
    assert texts == ["premier", "deuxième", "troisième"]
    attachment = session.exec(select(Attachment)).one()
    assert session.get(Message, attachment.message_id).ticket_id == target.id  # type: ignore[union-attr]
    assert (source.status, source.merged_into_id, source.status_changed_at) == (
        "closed", target.id, NOW)
    # The source's requester and watchers keep hearing of the request on the target.
    assert [a.email for a in ticket_life.followers(session, target.id)] == [COLLEAGUE]
    assert [a.email for a in ticket_life.watchers(session, target.id)] == [AGENT]
    assert _events(session, "ticket.merge") == [
        (AGENT, source.id, {"from": source.id, "to": target.id, "status": "open",
                            "messages": 2}),
        (AGENT, target.id, {"from": source.id, "to": target.id, "messages": 2}),
    ]


def test_merge_refusals(session: Session) -> None:
    one, two, three = _ticket(session), _ticket(session), _ticket(session)
    with pytest.raises(TicketActionError, match=f"cannot merge ticket #{one.id} into itself"):
        ticket_life.merge(session, source=one, target=one, actor=AGENT)
    ticket_life.merge(session, source=two, target=one, actor=AGENT)
    with pytest.raises(TicketActionError, match=f"#{two.id} was merged into #{one.id}; merge "
                                                "into that one"):
        ticket_life.merge(session, source=three, target=two, actor=AGENT)
    with pytest.raises(TicketActionError, match=f"#{two.id} was merged into #{one.id}; act on"):
        ticket_life.merge(session, source=two, target=three, actor=AGENT)
    directory.add_company(session, name="Autre SARL", after_hours=False, actor="test")
    directory.add_account(session, email="paul@autre.example", name="Paul",
                          company="Autre SARL", actor="test")
    other = _ticket(session, email="paul@autre.example")
    with pytest.raises(TicketActionError, match="belong to different companies"):
        ticket_life.merge(session, source=other, target=three, actor=AGENT)
    assert (three.status, other.status) == ("open", "open")
    assert session.exec(select(Message).where(Message.ticket_id == other.id)).all() != []


def test_follow_only_active_colleagues_of_the_same_company(session: Session) -> None:
    ticket = _ticket(session)
    colleague = directory.find_account(session, COLLEAGUE)
    requester = directory.find_account(session, CUSTOMER)
    assert colleague is not None and requester is not None
    ticket_life.follow(session, ticket=ticket, account=colleague, actor=CUSTOMER)
    with pytest.raises(TicketActionError, match="already follows"):
        ticket_life.follow(session, ticket=ticket, account=colleague, actor=CUSTOMER)
    with pytest.raises(TicketActionError, match="is the requester"):
        ticket_life.follow(session, ticket=ticket, account=requester, actor=CUSTOMER)
    directory.add_company(session, name="Autre SARL", after_hours=False, actor="test")
    outsider = directory.add_account(session, email="paul@autre.example", name="Paul",
                                     company="Autre SARL", actor="test")
    with pytest.raises(TicketActionError, match="is not of the company"):
        ticket_life.follow(session, ticket=ticket, account=outsider, actor=CUSTOMER)
    gone = directory.add_account(session, email="ex@client.example", name="Ex",
                                 company="Client SA", actor="test")
    gone.deactivated_at = NOW
    with pytest.raises(TicketActionError, match=r"account ex@client\.example is not active"):
        ticket_life.follow(session, ticket=ticket, account=gone, actor=CUSTOMER)
    assert [a.email for a in ticket_life.followers(session, ticket.id)] == [COLLEAGUE]
    assert _events(session, "ticket.follow") == [(CUSTOMER, ticket.id, {"account": COLLEAGUE})]


def test_history_lists_the_changes_in_order_without_the_access_log(session: Session) -> None:
    from maildesk.store.access_log import record_read

    ticket = _ticket(session)
    ticket_life.set_priority(session, ticket=ticket, priority="high", actor=AGENT)
    record_read(session, actor="cli:ops", ticket_id=ticket.id, what="ticket")
    ticket_life.set_status(session, ticket=ticket, status="solved", actor=AGENT)
    assert ticket.id is not None
    entries = ticket_life.history(session, ticket.id)
    assert [(e.actor, e.action, e.detail) for e in entries] == [
        (AGENT, "ticket.priority", {"from": "normal", "to": "high"}),
        (AGENT, "ticket.status", {"from": "open", "to": "solved"}),
    ]
    assert entries[0].at <= entries[1].at


def test_describe_says_unattended_when_no_agent_may_see_the_ticket(session: Session) -> None:
    ticket = _ticket(session)
    assert ticket_life.describe(session, ticket)["unattended"] is False
    directory.deactivate_agent(session, email=AGENT, actor="test")
    # Only the US agent is left, and the company has no after-hours support.
    view = ticket_life.describe(session, ticket)
    assert (view["unattended"], view["assignee"], view["priority"]) == (True, None, "normal")
    company = session.get(Company, ticket.company_id)
    assert company is not None
    company.after_hours = True
    session.flush()
    assert ticket_life.describe(session, ticket)["unattended"] is False


def test_a_watcher_row_is_unique_in_the_database(session: Session) -> None:
    ticket = _ticket(session)
    alice = _agent(session, AGENT)
    session.add(TicketWatcher(ticket_id=ticket.id, agent_id=alice.id))  # type: ignore[arg-type]
    session.flush()
    session.add(TicketWatcher(ticket_id=ticket.id, agent_id=alice.id))  # type: ignore[arg-type]
    with pytest.raises(sa.exc.IntegrityError):
        session.flush()
    session.rollback()
