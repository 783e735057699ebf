"""Tickets worked by mail, in-process on SQLite and PostgreSQL: agents' commands and notes,
the customer's #close, the reopen rule, who hears of a follow-up, forwards, colleagues in Cc."""

from __future__ import annotations

import json
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog
from e2e import AGENT, COLLEAGUE, CUSTOMER, DESK, customer_mail
from outgoing import composed
from sqlmodel import Session, col, select
from support_fixtures import make_pipeline

from maildesk.mail.message import Delivery
from maildesk.pipeline import Pipeline
from maildesk.signing import principal_of_account, principal_of_agent, reply_address
from maildesk.store import database, directory, ticket_life
from maildesk.store.models import Account, InboundMail, Message, Outbox, Ticket, utcnow

SMTP = Delivery(source="smtp", envelope_from=CUSTOMER, recipients=(DESK,))
CHLOE = "chloe.bernard@vendor.example"
TRUSTED = "mx.desk.example"
PASS_AGENT = f"{TRUSTED}; dkim=pass header.d=vendor.example; dmarc=pass header.from=vendor.example"


def outbox(engine: sa.Engine, kind: str | None = None) -> list[Outbox]:
    with Session(engine) as session:
        query = select(Outbox).order_by(col(Outbox.id))
        if kind is not None:
            query = query.where(Outbox.kind == kind)
        return list(session.exec(query))


def ticket(engine: sa.Engine, ticket_id: int = 1) -> Ticket:
    with Session(engine) as session:
        found = session.get(Ticket, ticket_id)
        assert found is not None
        return found


def history(engine: sa.Engine, ticket_id: int = 1) -> list[tuple[str, str]]:
    with Session(engine) as session:
        return [(e.actor, e.action) for e in ticket_life.history(session, ticket_id)]


def to(row: Outbox) -> str:
    [address] = json.loads(row.recipients)
    return str(address)


def body(row: Outbox) -> str:
    sent = message_from_bytes(composed(row), policy=policy.default)
    return sent.get_body(("plain",)).get_content()  # type: ignore[union-attr]


def add_chloe(engine: sa.Engine) -> None:
    with database.session_scope(engine) as session:
        directory.add_agent(session, email=CHLOE, name="Chloé Bernard", region="eu", actor="t")


def open_ticket(pipeline: Pipeline, **headers: str) -> None:
    assert pipeline.process(customer_mail(**headers).as_bytes(), SMTP).ticket_id == 1


def agent_reply(pipeline: Pipeline, text: str, *, agent_id: int = 1, sender: str = AGENT,
                ticket_id: int = 1) -> EmailMessage:
    address = reply_address(pipeline.reply_keys, DESK, ticket_id, principal_of_agent(agent_id))
    return customer_mail(sender=sender, to=address, subject=f"Re: [#{ticket_id}] Export PDF",
                         text=text)


def customer_reply(pipeline: Pipeline, text: str, ticket_id: int = 1) -> EmailMessage:
    address = reply_address(pipeline.reply_keys, DESK, ticket_id, principal_of_account(1))
    return customer_mail(to=address, subject=f"Re: [#{ticket_id}] Export PDF", text=text)


@pytest.mark.parametrize(("command", "field", "value", "action"), [
    ("#close", "status", "closed", "ticket.status"),
    ("#fermer", "status", "closed", "ticket.status"),
    ("#solved", "status", "solved", "ticket.status"),
    ("#pending", "status", "pending", "ticket.status"),
    ("#priority urgent", "priority", "urgent", "ticket.priority"),
    ("#priorité haute", "priority", "high", "ticket.priority"),
    ("#assign me", "assignee_id", 1, "ticket.assign"),
    (f"#assign {CHLOE}", "assignee_id", 3, "ticket.assign"),
])
def test_each_command_is_applied_recorded_and_confirmed(
    pipeline: Pipeline, engine: sa.Engine, command: str, field: str, value: object, action: str
) -> None:
    add_chloe(engine)
    open_ticket(pipeline)
    before = len(outbox(engine))
    outcome = pipeline.process(agent_reply(pipeline, command).as_bytes(), SMTP)
    assert (outcome.outcome, outcome.reason) == ("commands", "commands")
    assert getattr(ticket(engine), field) == value
    assert (AGENT, action) in history(engine)
    # One short confirmation to the agent, and nothing to the customer.
    [confirmation] = outbox(engine)[before:]
    assert (confirmation.kind, to(confirmation)) == ("commands_done", AGENT)
    assert command in body(confirmation)


def test_watch_and_open_and_merge(pipeline: Pipeline, engine: sa.Engine) -> None:
    open_ticket(pipeline)
    pipeline.process(agent_reply(pipeline, "#watch\n#solved").as_bytes(), SMTP)
    with Session(engine) as session:
        assert [a.email for a in ticket_life.watchers(session, 1)] == [AGENT]
    assert ticket(engine).status == "solved"
    assert pipeline.process(agent_reply(pipeline, "#rouvrir").as_bytes(), SMTP).outcome == (
        "commands"
    )
    assert ticket(engine).status == "open" and (AGENT, "ticket.reopen") in history(engine)
    second = customer_mail(subject="Autre souci")
    assert pipeline.process(second.as_bytes(), SMTP).ticket_id == 2
    pipeline.process(agent_reply(pipeline, "#merge [#2]").as_bytes(), SMTP)
    merged = ticket(engine)
    assert (merged.status, merged.merged_into_id) == ("closed", 2)
    assert [row.kind for row in outbox(engine)][-1] == "commands_done"


def test_commands_and_an_answer_reach_the_customer_without_the_command_lines(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    open_ticket(pipeline)
    reply = agent_reply(pipeline, "#assign me\n#priority high\n\nMerci, nous regardons.")
    outcome = pipeline.process(reply.as_bytes(), SMTP)
    assert (outcome.outcome, outcome.reason) == ("answer", "commands")
    found = ticket(engine)
    assert (found.assignee_id, found.priority) == (1, "high")
    [answer] = outbox(engine, "answer")
    assert to(answer) == CUSTOMER
    assert "Merci, nous regardons." in body(answer)
    assert "#assign" not in body(answer) and "#priority" not in body(answer)
    with Session(engine) as session:
        relayed = session.exec(select(Message).where(Message.author_kind == "agent")).one()
    assert (relayed.text, relayed.rule, relayed.internal) == (
        "Merci, nous regardons.", "agent-commands", False)
    [confirmation] = outbox(engine, "commands_done")
    assert to(confirmation) == AGENT and "#priority high" in body(confirmation)


def test_an_unknown_command_changes_nothing_and_gets_the_valid_ones(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    open_ticket(pipeline)
    before = len(outbox(engine))
    reply = agent_reply(pipeline, "#priority high\n#frobnicate\n\nUne réponse.")
    outcome = pipeline.process(reply.as_bytes(), SMTP)
    assert (outcome.outcome, outcome.reason) == (
        "quarantined", 'commands refused: unknown command "#frobnicate"')
    assert ticket(engine).priority == "normal"
    [refusal] = outbox(engine)[before:]
    assert (refusal.kind, to(refusal)) == ("commands_refused", AGENT)
    text = body(refusal)
    assert '#frobnicate' in text and "#priority low|normal|high|urgent" in text
    assert "#priorité basse|normale|haute|urgente" in text


def test_a_command_the_ticket_refuses_undoes_the_whole_mail(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    open_ticket(pipeline)
    before = len(outbox(engine))
    reply = agent_reply(pipeline, "#priority high\n#assign nobody@vendor.example\n\nRéponse.")
    outcome = pipeline.process(reply.as_bytes(), SMTP)
    assert outcome.reason == "commands refused: no agent nobody@vendor.example"
    assert ticket(engine).priority == "normal"
    assert [row.kind for row in outbox(engine)[before:]] == ["commands_refused"]
    with Session(engine) as session:
        assert session.exec(select(Message).where(Message.author_kind == "agent")).all() == []


def test_a_note_stays_internal_and_goes_to_the_other_agents(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    add_chloe(engine)
    open_ticket(pipeline)
    before = len(outbox(engine))
    note = agent_reply(pipeline, "#note\n\nLe client a un contrat ancien, voir avec Chloé.")
    assert pipeline.process(note.as_bytes(), SMTP).reason == "internal note"
    sent = outbox(engine)[before:]
    assert sorted((row.kind, to(row)) for row in sent) == [
        ("commands_done", AGENT), ("followup", CHLOE)]
    assert CUSTOMER not in [to(row) for row in sent]
    copy = next(row for row in sent if row.kind == "followup")
    assert "Note interne de Alice Martin" in body(copy)
    assert "voir avec Chloé" in body(copy)
    with Session(engine) as session:
        stored = session.exec(select(Message).where(col(Message.internal).is_(True))).one()
    assert (stored.rule, stored.text) == ("agent-note",
                                          "Le client a un contrat ancien, voir avec Chloé.")


def test_a_customer_closes_their_own_ticket(pipeline: Pipeline, engine: sa.Engine) -> None:
    open_ticket(pipeline)
    outcome = pipeline.process(customer_reply(pipeline, "#fermer\n\nC'est réglé, merci.")
                               .as_bytes(), SMTP)
    assert (outcome.outcome, outcome.reason) == ("followup", "closed by the customer")
    assert ticket(engine).status == "closed"
    assert (CUSTOMER, "ticket.status") in history(engine)
    with Session(engine) as session:
        last = session.exec(select(Message).order_by(col(Message.id).desc())).first()
    assert last is not None and (last.text, last.rule) == ("C'est réglé, merci.",
                                                           "customer-close")


def close_days_ago(engine: sa.Engine, days: int) -> None:
    with database.session_scope(engine) as session:
        found = session.get(Ticket, 1)
        assert found is not None
        ticket_life.set_status(session, ticket=found, status="closed", actor="t",
                               now=utcnow() - timedelta(days=days))


def test_a_reply_reopens_within_reopen_days_and_opens_a_new_ticket_after(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    open_ticket(pipeline)
    close_days_ago(engine, 13)
    outcome = pipeline.process(customer_reply(pipeline, "Toujours en panne.").as_bytes(), SMTP)
    assert (outcome.outcome, outcome.ticket_id, outcome.reason) == (
        "followup", 1, "reopens a closed ticket")
    assert ticket(engine).status == "open" and (CUSTOMER, "ticket.reopen") in history(engine)
    close_days_ago(engine, 15)
    acknowledgements = len(outbox(engine, "acknowledgement"))
    late = customer_reply(pipeline, "Encore ce souci, des semaines après.")
    outcome = pipeline.process(late.as_bytes(), SMTP)
    assert (outcome.outcome, outcome.ticket_id, outcome.reason) == (
        "ticket", 2, "follows a closed ticket #1")
    assert ticket(engine, 2).follows_id == 1 and ticket(engine).status == "closed"
    [ack] = outbox(engine, "acknowledgement")[acknowledgements:]
    assert (ack.ticket_id, to(ack)) == (2, CUSTOMER)
    with Session(engine) as session:
        [first] = session.exec(select(Message).where(Message.ticket_id == 2)).all()
    assert first.rule == "customer-new-after-closed"


def test_once_assigned_follow_ups_go_to_the_assignee_and_the_watchers(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    add_chloe(engine)
    open_ticket(pipeline)
    assert sorted(to(row) for row in outbox(engine, "new_ticket")) == [AGENT, CHLOE]
    pipeline.process(agent_reply(pipeline, f"#assign {CHLOE}").as_bytes(), SMTP)
    pipeline.process(customer_reply(pipeline, "Une précision.").as_bytes(), SMTP)
    [followup] = outbox(engine, "followup")
    assert to(followup) == CHLOE
    # The agent's copy shows the ticket's state and how to work it by mail.
    text = body(followup)
    assert "Statut : ouverte · Priorité : normale · Assignée à : Chloé Bernard" in text
    assert "Commandes, une par ligne en haut de votre réponse" in text
    pipeline.process(agent_reply(pipeline, "#watch").as_bytes(), SMTP)
    pipeline.process(customer_reply(pipeline, "Une autre précision.").as_bytes(), SMTP)
    assert sorted(to(row) for row in outbox(engine, "followup")[1:]) == [AGENT, CHLOE]


def test_a_ticket_with_no_eligible_agent_is_filed_and_logged(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    with database.session_scope(engine) as session:
        directory.deactivate_agent(session, email=AGENT, actor="t")
    with structlog.testing.capture_logs() as logs:
        outcome = pipeline.process(customer_mail().as_bytes(), SMTP)
    assert (outcome.outcome, outcome.ticket_id) == ("ticket", 1)
    assert [row.kind for row in outbox(engine)] == ["acknowledgement"]
    assert {"event": "ticket unattended", "ticket": 1, "log_level": "warning"} in [
        {k: e.get(k) for k in ("event", "ticket", "log_level")} for e in logs]


def forward(sender: str, *, first_line: str = "#new") -> EmailMessage:
    text = (f"{first_line}\n\n---------- Forwarded message ---------\n"
            f"From: Someone <{sender}>\nDate: Tue, 1 Dec 2026 at 10:00\n"
            "Subject: Facture introuvable\nTo: Alice Martin <alice.martin@vendor.example>\n\n"
            "Bonjour, je ne trouve plus ma facture de novembre.\n")
    mail = customer_mail(sender=AGENT, subject="Fwd: Facture introuvable", text=text)
    mail["Authentication-Results"] = PASS_AGENT
    return mail


@pytest.fixture
def trusting(engine: sa.Engine, tmp_path: Path) -> Pipeline:
    """A pipeline that trusts mx.desk.example's verdicts: forwards need them."""
    return make_pipeline(engine, tmp_path, trusted_authserv_id=TRUSTED)


def test_an_agent_forwards_an_accounts_mail_to_open_a_ticket(
    trusting: Pipeline, engine: sa.Engine
) -> None:
    outcome = trusting.process(forward(COLLEAGUE).as_bytes(), SMTP)
    assert (outcome.outcome, outcome.ticket_id, outcome.reason) == (
        "ticket", 1, "forwarded to open")
    opened = ticket(engine)
    assert opened.subject == "Facture introuvable"
    with Session(engine) as session:
        [first] = session.exec(select(Message)).all()
        assert session.get(Account, opened.account_id).email == COLLEAGUE  # type: ignore[union-attr]
    assert (first.author_email, first.rule) == (COLLEAGUE, "forward-new")
    assert first.text == "Bonjour, je ne trouve plus ma facture de novembre."
    assert (AGENT, "ticket.forward_open") in history(engine)
    [ack] = outbox(engine, "acknowledgement")
    assert to(ack) == COLLEAGUE


def test_a_forward_for_a_stranger_is_refused(trusting: Pipeline, engine: sa.Engine) -> None:
    outcome = trusting.process(forward("eve@elsewhere.example").as_bytes(), SMTP)
    assert (outcome.outcome, outcome.reason) == (
        "quarantined", "the forwarded sender is not an active account")
    with Session(engine) as session:
        assert session.exec(select(Ticket)).all() == []
    [notice] = outbox(engine)
    assert (notice.kind, to(notice)) == ("agent_refused", AGENT)
    assert "the forwarded sender is not an active account" in body(notice)


def test_a_colleague_in_cc_follows_and_hears_the_answers(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    open_ticket(pipeline, Cc=f"Marc Petit <{COLLEAGUE}>")
    with Session(engine) as session:
        assert [a.email for a in ticket_life.followers(session, 1)] == [COLLEAGUE]
    pipeline.process(agent_reply(pipeline, "Le correctif est en ligne.").as_bytes(), SMTP)
    assert sorted(to(row) for row in outbox(engine, "answer")) == sorted([COLLEAGUE, CUSTOMER])


def test_nobody_else_is_added_from_to_or_cc(pipeline: Pipeline, engine: sa.Engine) -> None:
    with database.session_scope(engine) as session:
        directory.add_company(session, name="Autre SA", after_hours=False, actor="t")
        directory.add_account(session, email="paul@autre.example", name="Paul",
                              company="Autre SA", actor="t")
    mail = customer_mail(Cc="paul@autre.example, eve@outsider.example")
    del mail["To"]
    mail["To"] = f"{DESK}, other@outsider.example"
    assert pipeline.process(mail.as_bytes(), SMTP).ticket_id == 1
    with Session(engine) as session:
        assert ticket_life.followers(session, 1) == []
    pipeline.process(agent_reply(pipeline, "Le correctif est en ligne.").as_bytes(), SMTP)
    assert [to(row) for row in outbox(engine, "answer")] == [CUSTOMER]
    with Session(engine) as session:
        held = session.exec(select(InboundMail)).all()
    assert [row.outcome for row in held] == ["ticket", "answer"]
