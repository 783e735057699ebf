"""`maildesk tickets revoke`, run as a process on a store that a real pipeline filed mail in."""

from __future__ import annotations

import getpass
import json
import re
import subprocess
import sys
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from e2e import AGENT, CUSTOMER, DESK, customer_mail
from outgoing import composed
from sqlmodel import Session, col, select
from support_fixtures import make_desk, make_pipeline

from maildesk.mail.message import Delivery
from maildesk.pipeline import Pipeline
from maildesk.signing import principal_of_agent, reply_address
from maildesk.store import database, directory
from maildesk.store.models import AuditEvent, Message, Outbox, Ticket

SMTP = Delivery(source="smtp", envelope_from=CUSTOMER, recipients=(DESK,))


def agent_reply(to: str) -> bytes:
    """The EU agent's answer to ticket 1, sent to `to`."""
    return customer_mail(sender=AGENT, to=to, subject="Re: [#1] Export PDF en erreur",
                         text="Bonjour Claire, le correctif est en ligne.").as_bytes()


def answers(engine: sa.Engine) -> list[Outbox]:
    with Session(engine) as session:
        return list(session.exec(select(Outbox).where(Outbox.kind == "answer")))


def test_revoke_makes_earlier_reply_addresses_worthless(
    pipeline: Pipeline, engine: sa.Engine, store_url: str, tmp_path: Path
) -> None:
    desk = make_desk(tmp_path, store_url)
    pipeline.process(customer_mail().as_bytes(), SMTP)
    # The address the agent got in the new-ticket notice, before the revoke.
    with Session(engine) as session:
        [notice] = session.exec(select(Outbox).where(Outbox.kind == "new_ticket")).all()
    issued = message_from_bytes(composed(notice), policy=policy.default)["Reply-To"].addresses[0]
    assert issued.addr_spec == reply_address(pipeline.reply_keys, DESK, 1, principal_of_agent(1))

    result = desk.cli("tickets", "revoke", "1", "--as", "alice.martin")
    assert (result.code, result.err) == (0, "")
    assert result.out == (
        "ticket #1: every reply address issued so far is revoked (reply epoch 1); "
        "new mails carry new ones\n"
    )

    refused = pipeline.process(agent_reply(issued.addr_spec), SMTP)
    # Its token no longer verifies, so the agent's mail is held for a person to look at.
    assert (refused.outcome, refused.reason) == (
        "quarantined", "agent mail without a signed reply address"
    )
    assert answers(engine) == []
    with Session(engine) as session:
        ticket = session.get(Ticket, 1)
        assert ticket is not None and ticket.reply_epoch == 1
        events = session.exec(
            select(AuditEvent).where(AuditEvent.action == "ticket.reply_addresses_revoked")
        ).all()
    assert [(e.actor, e.ticket_id) for e in events] == [("alice.martin", 1)]

    # The addresses of the new epoch still work: only the earlier ones were revoked.
    fresh = reply_address(pipeline.reply_keys, DESK, 1, principal_of_agent(1), epoch=1)
    assert pipeline.process(agent_reply(fresh), SMTP).outcome == "answer"
    assert len(answers(engine)) == 1


def test_revoke_without_as_records_the_os_user_and_a_missing_ticket_is_not_found(
    pipeline: Pipeline, engine: sa.Engine, store_url: str, tmp_path: Path
) -> None:
    desk = make_desk(tmp_path, store_url)
    missing = desk.cli("tickets", "revoke", "1")
    assert (missing.code, missing.out, missing.err) == (1, "", "maildesk: error: no ticket #1\n")
    pipeline.process(customer_mail().as_bytes(), SMTP)
    assert desk.cli("tickets", "revoke", "1").code == 0
    with Session(engine) as session:
        events = session.exec(
            select(AuditEvent).where(AuditEvent.action == "ticket.reply_addresses_revoked")
        ).all()
    assert [(e.actor, e.ticket_id) for e in events] == [(f"cli:{getpass.getuser()}", 1)]


# The ticket's life from the CLI: every command, its refusal, and what list and show say.

US_AGENT = "bob.smith@vendor.example"


def _desk_with_tickets(tmp_path: Path, count: int = 1) -> tuple[Any, sa.Engine]:
    """A desk on SQLite whose real pipeline filed `count` tickets of the customer."""
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    desk = make_desk(tmp_path, url)
    engine = database.make_engine(url)
    pipeline = make_pipeline(engine, tmp_path)
    for n in range(count):
        mail = customer_mail(subject=f"Export PDF en erreur {n + 1}")
        assert pipeline.process(mail.as_bytes(), SMTP).outcome == "ticket"
    pipeline.close()
    return desk, engine


def _error(result: Any) -> tuple[int, str, str]:
    return result.code, result.out, result.err


def test_status_commands_and_their_refusals(tmp_path: Path) -> None:
    desk, engine = _desk_with_tickets(tmp_path)
    as_alice = ("--as", AGENT)
    assert desk.cli("tickets", "pending", "1", *as_alice).out == "ticket #1: pending (was open)\n"
    assert desk.cli("tickets", "solve", "1", *as_alice).out == "ticket #1: solved (was pending)\n"
    assert desk.cli("tickets", "close", "1").out == "ticket #1: closed (was solved)\n"
    assert _error(desk.cli("tickets", "close", "1")) == (
        1, "", "maildesk: error: ticket #1 is already closed\n")
    assert desk.cli("tickets", "reopen", "1", *as_alice).out == "ticket #1: reopened (was closed)\n"
    assert _error(desk.cli("tickets", "reopen", "1")) == (
        1, "", "maildesk: error: ticket #1 is open, not solved or closed\n")
    assert _error(desk.cli("tickets", "solve", "9")) == (1, "", "maildesk: error: no ticket #9\n")
    assert _error(desk.cli("tickets", "close", "1", "--as", "nobody@vendor.example")) == (
        1, "", "maildesk: error: no agent with email nobody@vendor.example\n")
    with Session(engine) as session:
        events = session.exec(
            select(AuditEvent).where(col(AuditEvent.action).in_(("ticket.status",
                                                                 "ticket.reopen")))
            .order_by(col(AuditEvent.id))
        ).all()
    assert [(e.actor, e.action, json.loads(e.detail or "{}")["to"]) for e in events] == [
        (AGENT, "ticket.status", "pending"), (AGENT, "ticket.status", "solved"),
        (f"cli:{getpass.getuser()}", "ticket.status", "closed"), (AGENT, "ticket.reopen", "open"),
    ]
    engine.dispose()


def test_a_us_agent_is_refused_on_a_company_without_after_hours(tmp_path: Path) -> None:
    desk, engine = _desk_with_tickets(tmp_path)
    refusal = (1, "", f"maildesk: error: agent {US_AGENT} is in the US team and the company of "
                      "ticket #1 has no after-hours support\n")
    for command in (("close", "1"), ("priority", "1", "high"), ("assign", "1", "me"),
                    ("note", "1", "vu"), ("watch", "1"), ("merge", "1", "1")):
        assert _error(desk.cli("tickets", *command, "--as", US_AGENT)) == refusal, command
    assert _error(desk.cli("tickets", "assign", "1", US_AGENT)) == refusal
    # Each refusal changed nothing.
    with Session(engine) as session:
        ticket = session.get(Ticket, 1)
        assert ticket is not None
        assert (ticket.status, ticket.priority, ticket.assignee_id) == ("open", "normal", None)
    with database.session_scope(engine) as session:
        directory.update_company(session, name="Client SA", after_hours=True, active=None,
                                 actor="test")
    assert desk.cli("tickets", "assign", "1", "me", "--as", US_AGENT).out == (
        f"ticket #1: assigned to {US_AGENT}\n")
    engine.dispose()


def test_assign_priority_note_and_watch(tmp_path: Path) -> None:
    desk, engine = _desk_with_tickets(tmp_path)
    assert desk.cli("tickets", "assign", "1", AGENT).out == f"ticket #1: assigned to {AGENT}\n"
    assert _error(desk.cli("tickets", "assign", "1", AGENT)) == (
        1, "", f"maildesk: error: ticket #1 is already assigned to {AGENT}\n")
    assert desk.cli("tickets", "assign", "1", "--none").out == "ticket #1: unassigned\n"
    assert _error(desk.cli("tickets", "assign", "1")) == (
        1, "", "maildesk: error: give an agent's email, me, or --none\n")
    assert _error(desk.cli("tickets", "assign", "1", "me")) == (
        1, "", "maildesk: error: assign REF me needs --as AGENT\n")
    assert desk.cli("tickets", "priority", "1", "urgent").out == (
        "ticket #1: priority urgent (was normal)\n")
    bad = desk.cli("tickets", "priority", "1", "critical")
    assert bad.code == 2 and "invalid choice: 'critical'" in bad.err
    assert _error(desk.cli("tickets", "note", "1", "Rappeler")) == (
        1, "", "maildesk: error: a note needs its author: --as AGENT\n")
    note = subprocess.run(
        [sys.executable, "-m", "maildesk", "--config", str(desk.config), "tickets", "note", "1",
         "-", "--as", AGENT],
        input="Client VIP.\nRappeler.\n", capture_output=True, text=True, timeout=60,
    )
    assert (note.returncode, note.stderr) == (0, "")
    assert note.stdout.startswith("ticket #1: internal note ")
    assert _error(desk.cli("tickets", "note", "1", "  ", "--as", AGENT)) == (
        1, "", "maildesk: error: the note is empty\n")
    assert desk.cli("tickets", "watch", "1", "--as", AGENT).out == (
        f"ticket #1: watched by {AGENT}\n")
    assert _error(desk.cli("tickets", "watch", "1", AGENT)) == (
        1, "", f"maildesk: error: {AGENT} already watches ticket #1\n")
    with Session(engine) as session:
        [stored] = session.exec(select(Message).where(col(Message.internal).is_(True))).all()
        assert (stored.text, stored.author_email) == ("Client VIP.\nRappeler.\n", AGENT)
        # The note reached nobody: the only mails are those of the ticket's opening.
        kinds = sorted(o.kind for o in session.exec(select(Outbox)))
        assert kinds == ["acknowledgement", "new_ticket"]
    engine.dispose()


def test_merge_and_its_refusals(tmp_path: Path) -> None:
    desk, engine = _desk_with_tickets(tmp_path, count=3)
    assert _error(desk.cli("tickets", "merge", "2", "2")) == (
        1, "", "maildesk: error: cannot merge ticket #2 into itself\n")
    assert _error(desk.cli("tickets", "merge", "2", "7")) == (
        1, "", "maildesk: error: no ticket #7\n")
    merged = desk.cli("tickets", "merge", "2", "1", "--as", AGENT)
    assert merged.out == "ticket #2: merged into #1 (1 messages moved); #2 is closed\n"
    assert _error(desk.cli("tickets", "merge", "3", "2")) == (
        1, "", "maildesk: error: ticket #2 was merged into #1; merge into that one\n")
    assert _error(desk.cli("tickets", "close", "2")) == (
        1, "", "maildesk: error: ticket #2 was merged into #1; act on that one\n")
    with Session(engine) as session:
        counts = {ref: len(session.exec(select(Message).where(Message.ticket_id == ref)).all())
                  for ref in (1, 2, 3)}
    assert counts == {1: 2, 2: 0, 3: 1}
    engine.dispose()


def test_list_filters_sorts_and_shows_priority_and_assignee(tmp_path: Path) -> None:
    desk, engine = _desk_with_tickets(tmp_path, count=3)
    assert desk.cli("tickets", "assign", "2", AGENT).code == 0
    assert desk.cli("tickets", "priority", "2", "high").code == 0
    assert desk.cli("tickets", "pending", "3").code == 0

    def refs(*options: str) -> list[int]:
        result = desk.cli("tickets", "list", "--json", *options)
        assert result.code == 0, result.err
        return [t["ref"] for t in json.loads(result.out)]

    assert refs() == [3, 2, 1]
    assert refs("--status", "pending") == [3]
    assert refs("--status", "open") == [2, 1]
    assert refs("--priority", "high") == [2]
    assert refs("--assignee", AGENT) == [2]
    assert refs("--assignee", "none") == [3, 1]
    assert refs("--company", "client sa") == [3, 2, 1]
    assert refs("--sort", "age") == [1, 2, 3]
    # Ticket 3 was changed last (made pending), then 2 (assigned, prioritised).
    assert refs("--sort", "updated") == [3, 2, 1]
    assert _error(desk.cli("tickets", "list", "--company", "Nope")) == (
        1, "", 'maildesk: error: no company "Nope"\n')
    assert _error(desk.cli("tickets", "list", "--assignee", "x@vendor.example")) == (
        1, "", "maildesk: error: no agent with email x@vendor.example\n")

    [second] = [t for t in json.loads(desk.cli("tickets", "list", "--json").out)
                if t["ref"] == 2]
    assert (second["priority"], second["assignee"], second["watchers"], second["followers"],
            second["unattended"]) == ("high", AGENT, [], [], False)
    assert [h["action"] for h in second["history"]][-2:] == ["ticket.assign", "ticket.priority"]
    rows = [re.split(r" {2,}", line) for line in desk.cli("tickets", "list").out.splitlines()]
    assert rows[0] == ["TICKET", "STATUS", "PRIORITY", "UPDATED", "REQUESTER", "COMPANY",
                       "ASSIGNEE", "SUBJECT", "MESSAGES"]
    assert [(r[0], r[1], r[2], r[6]) for r in rows[1:]] == [
        ("#3", "pending", "normal", "-"), ("#2", "open", "high", AGENT),
        ("#1", "open", "normal", "-"),
    ]
    # With no agent left who may see the company's tickets, they are unattended.
    with database.session_scope(engine) as session:
        directory.deactivate_agent(session, email=AGENT, actor="test")
    rows = [re.split(r" {2,}", line) for line in desk.cli("tickets", "list").out.splitlines()]
    assert [r[6] for r in rows[1:]] == ["unattended", "unattended", "unattended"]
    engine.dispose()


def test_show_gives_priority_people_and_history_in_text_and_json(tmp_path: Path) -> None:
    desk, engine = _desk_with_tickets(tmp_path)
    for command in (("priority", "1", "urgent"), ("assign", "1", AGENT), ("watch", "1"),
                    ("note", "1", "Client VIP"), ("pending", "1")):
        assert desk.cli("tickets", *command, "--as", AGENT).code == 0, command
    shown = desk.cli("tickets", "show", "1")
    assert shown.code == 0, shown.err
    lines = shown.out.splitlines()
    assert lines[2] == (f"priority: urgent; assignee: {AGENT}; watchers: {AGENT}; "
                        "followers: none")
    assert any(line.endswith(f"agent Alice Martin <{AGENT}> (internal note)") for line in lines)
    history = lines[lines.index("history:") + 1:]
    assert [line.strip().split(" ", 3)[2:] for line in history] == [
        [CUSTOMER, "ticket.open"], [CUSTOMER, "ticket.message"],
        [AGENT, "ticket.priority: normal -> urgent"], [AGENT, f"ticket.assign: - -> {AGENT}"],
        [AGENT, f"ticket.watch (agent {AGENT})"], [AGENT, "ticket.note (message 2)"],
        [AGENT, "ticket.status: open -> pending"],
    ]
    view = json.loads(desk.cli("tickets", "show", "1", "--json").out)
    assert (view["status"], view["priority"], view["assignee"], view["watchers"],
            view["followers"], view["merged_into"], view["unattended"]) == (
        "pending", "urgent", AGENT, [AGENT], [], None, False)
    assert [m["internal"] for m in view["messages"]] == [False, True]
    assert [(h["actor"], h["action"], h["detail"]) for h in view["history"]][2:4] == [
        (AGENT, "ticket.priority", {"from": "normal", "to": "urgent"}),
        (AGENT, "ticket.assign", {"from": None, "to": AGENT}),
    ]
    assert view["status_changed_at"] is not None
    engine.dispose()
