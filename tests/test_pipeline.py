"""The pipeline in-process, on SQLite and PostgreSQL: one mail, one transaction, one outcome."""

from __future__ import annotations

import threading
from email import message_from_bytes, policy
from pathlib import Path

import pytest
import sqlalchemy as sa
from e2e import AGENT, CUSTOMER, DESK, customer_mail
from outgoing import composed
from sqlmodel import Session, select

from maildesk.config import DeskSettings, SecuritySettings, Settings
from maildesk.mail.message import Delivery, StoreUnavailable
from maildesk.outbound.notify import Notifier
from maildesk.pipeline import Pipeline
from maildesk.signing import principal_of_account, principal_of_agent, reply_address
from maildesk.store import database, directory
from maildesk.store.files import ATTACHMENTS_DIR, content_path
from maildesk.store.intake import stored_uids
from maildesk.store.models import Attachment, InboundMail, Message, Outbox, Ticket
from maildesk.store.tickets import revoke_reply_addresses

DATA = Path(__file__).parent / "data"
IMAP = Delivery(source="imap", mailbox="INBOX", uidvalidity=7, uid=1)
SMTP = Delivery(source="smtp", envelope_from=CUSTOMER, recipients=(DESK,))


def rows(engine: sa.Engine, model: type) -> list:  # type: ignore[type-arg]
    with Session(engine) as session:
        return list(session.exec(select(model)))


def test_a_new_ticket_and_its_notifications_commit_together(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    outcome = pipeline.process(customer_mail().as_bytes(), IMAP)
    assert (outcome.outcome, outcome.ticket_id) == ("ticket", 1)
    assert [(o.kind, o.recipients) for o in rows(engine, Outbox)] == [
        ("acknowledgement", f'["{CUSTOMER}"]'), ("new_ticket", f'["{AGENT}"]'),
    ]
    assert set(stored_uids(pipeline.engine, "INBOX", 7, [1, 2])) == {1}
    assert stored_uids(pipeline.engine, "INBOX", 8, [1]) == {}


def test_the_same_mail_twice_is_filed_once(pipeline: Pipeline, engine: sa.Engine) -> None:
    raw = customer_mail().as_bytes()
    first = pipeline.process(raw, SMTP)
    again = pipeline.process(raw, SMTP)
    assert again.outcome == "duplicate" and again.inbound_id == first.inbound_id
    assert len(rows(engine, Ticket)) == 1 and len(rows(engine, Outbox)) == 2


def test_attachments_are_stored_by_content_hash(pipeline: Pipeline, engine: sa.Engine) -> None:
    # The sample was sent by someone who is an agent in this desk; make it a customer's.
    raw = (DATA / "outlook_attachment_accented_name.eml").read_bytes()
    raw = raw.replace(b"alice.martin@vendor.example", CUSTOMER.encode())
    assert pipeline.process(raw, SMTP).outcome == "ticket"
    [attachment] = rows(engine, Attachment)
    assert attachment.filename == "Facture_réglée_n°12.pdf"
    stored = content_path(pipeline.settings.desk.state_dir, ATTACHMENTS_DIR, attachment.sha256)
    assert stored.stat().st_size == attachment.size
    # The agents get the file itself; the customer's acknowledgement carries nothing of it.
    # The row refers to the stored file, and the sender reads it as the mail leaves.
    state = pipeline.settings.desk.state_dir
    queued = rows(engine, Outbox)
    assert all(o.raw == b"" and o.draft is not None for o in queued)
    assert all(attachment.sha256 in o.draft and b"JVBER" not in o.draft.encode() for o in queued
               if o.kind == "new_ticket")
    mails = {o.kind: message_from_bytes(composed(o, state), policy=policy.default) for o in queued}
    [sent] = list(mails["new_ticket"].iter_attachments())
    assert sent.get_filename() == "Facture_réglée_n°12.pdf"
    assert sent.get_content() == stored.read_bytes()
    assert list(mails["acknowledgement"].iter_attachments()) == []


def test_a_deactivated_account_opens_nothing(pipeline: Pipeline, engine: sa.Engine) -> None:
    with database.session_scope(engine) as session:
        directory.deactivate_account(session, email=CUSTOMER, actor="t")
    outcome = pipeline.process(customer_mail().as_bytes(), SMTP)
    assert (outcome.outcome, outcome.reason) == ("quarantined", "account deactivated")
    assert rows(engine, Ticket) == []
    assert [o.kind for o in rows(engine, Outbox)] == ["unknown_sender"]


def test_an_agent_needs_a_reply_address_signed_for_them(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    pipeline.process(customer_mail().as_bytes(), SMTP)
    unsigned = customer_mail(sender=AGENT, subject="Re: [#1]", text="Réponse")
    assert pipeline.process(unsigned.as_bytes(), SMTP).reason == (
        "agent mail without a signed reply address"
    )
    # The customer's own signed address does not let an agent (or anyone) answer as the desk.
    customers = reply_address(pipeline.reply_keys, DESK, 1, principal_of_account(1))
    stolen = customer_mail(sender=AGENT, to=customers, text="Réponse")
    assert pipeline.process(stolen.as_bytes(), SMTP).outcome == "quarantined"
    agents_address = reply_address(pipeline.reply_keys, DESK, 1, principal_of_agent(1))
    signed = customer_mail(sender=AGENT, to=agents_address,
                           text="Voici la réponse.\n\nLe lun. 1 déc. 2026, Claire a écrit :\n> x")
    outcome = pipeline.process(signed.as_bytes(), SMTP)
    assert (outcome.outcome, outcome.ticket_id) == ("answer", 1)
    answer = rows(engine, Message)[-1]
    assert (answer.direction, answer.author_kind, answer.text) == ("out", "agent",
                                                                   "Voici la réponse.")
    assert rows(engine, Outbox)[-1].kind == "answer"


def test_an_automatic_mail_from_a_customer_is_kept_and_not_answered(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    ooo = customer_mail(Auto_Submitted="auto-replied", subject="Absence")
    outcome = pipeline.process(ooo.as_bytes(), SMTP)
    assert (outcome.outcome, outcome.reason) == ("ignored", "automatic: auto-submitted")
    assert rows(engine, Outbox) == [] and rows(engine, Ticket) == []


def test_a_bug_on_one_mail_quarantines_it_and_leaves_nothing_half_done(
    pipeline: Pipeline, engine: sa.Engine, tmp_path: Path
) -> None:
    # Templates that are not there make the notify stage fail after the ticket was created.
    pipeline.notifier = Notifier(pipeline.settings, pipeline.reply_keys, tmp_path / "none")
    outcome = pipeline.process(customer_mail().as_bytes(), SMTP)
    assert (outcome.outcome, outcome.reason) == ("quarantined", "internal error: TemplateNotFound")
    assert rows(engine, Ticket) == [] and rows(engine, Outbox) == []
    [held] = rows(engine, InboundMail)
    assert held.outcome == "quarantined"


def test_an_unreachable_database_says_try_again(tmp_path: Path) -> None:
    engine = database.make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    settings = Settings(
        desk=DeskSettings(address=DESK, state_dir=tmp_path),
        security=SecuritySettings(reply_key="k"),  # type: ignore[arg-type]
    )
    with pytest.raises(StoreUnavailable):
        Pipeline(settings, engine).process(customer_mail().as_bytes(), SMTP)


def test_two_instances_filing_the_same_mail_at_once_file_it_once(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    other = Pipeline(pipeline.settings, engine)
    raw = customer_mail().as_bytes()
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def deliver(instance: Pipeline) -> None:
        start.wait()
        outcomes.append(instance.process(raw, SMTP).outcome)

    threads = [threading.Thread(target=deliver, args=(p,)) for p in (pipeline, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["duplicate", "ticket"]
    assert len(rows(engine, Ticket)) == 1 and len(rows(engine, Outbox)) == 2


def test_revoked_reply_addresses_let_nobody_in(pipeline: Pipeline, engine: sa.Engine) -> None:
    pipeline.process(customer_mail().as_bytes(), SMTP)
    issued = reply_address(pipeline.reply_keys, DESK, 1, principal_of_agent(1))
    with database.session_scope(engine) as session:
        ticket = session.get(Ticket, 1)
        assert ticket is not None
        assert revoke_reply_addresses(session, ticket=ticket, actor="dpo") == 1
    late = customer_mail(sender=AGENT, to=issued, text="Réponse")
    assert pipeline.process(late.as_bytes(), SMTP).reason == (
        "agent mail without a signed reply address"
    )
    fresh = reply_address(pipeline.reply_keys, DESK, 1, principal_of_agent(1), epoch=1)
    answer = customer_mail(sender=AGENT, to=fresh, text="Réponse", subject="Re: [#1]")
    assert pipeline.process(answer.as_bytes(), SMTP).outcome == "answer"
