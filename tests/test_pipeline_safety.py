"""The pipeline, safe by mail: bounces, machines, strangers, limits and oversized mail."""

from __future__ import annotations

import json
from email import message_from_bytes, policy
from pathlib import Path

import pytest
import sqlalchemy as sa
from e2e import AGENT, CUSTOMER, DESK, customer_mail
from outgoing import composed
from sqlmodel import Session, select
from support_fixtures import make_pipeline

from maildesk.config import LimitsSettings
from maildesk.mail.message import Delivery
from maildesk.pipeline import Pipeline
from maildesk.store.models import Account, AuditEvent, InboundMail, Outbox, Ticket

DSN = Path(__file__).parent / "data" / "dsn"
SMTP = Delivery(source="smtp", envelope_from=CUSTOMER, recipients=(DESK,))
TRUSTED = "mx.desk.example"


def rows(engine: sa.Engine, model: type) -> list:  # type: ignore[type-arg]
    with Session(engine) as session:
        return list(session.exec(select(model)))


def bounce_of(sample: str, sent: Outbox, *, by_verp: bool) -> bytes:
    """A corpus bounce rewritten to name a mail that this desk really sent."""
    raw = (DSN / sample).read_bytes()
    raw = raw.replace(b"paul.leroy@client.example", CUSTOMER.encode())
    raw = raw.replace(b"<176489721201.12345.4242424242424242424.maildesk@desk.example>",
                      sent.message_id.encode())
    # Matched by its VERP token, or, with a token that names nothing, by its Message-ID alone.
    token = (sent.verp or "").encode() if by_verp else b"0000000000000000"
    return raw.replace(b"3f9a1c2e7b4d8a60", token)


@pytest.mark.parametrize("by_verp", [True, False])
def test_a_hard_bounce_is_recorded_on_its_ticket_and_told_to_the_agents(
    pipeline: Pipeline, engine: sa.Engine, by_verp: bool
) -> None:
    pipeline.process(customer_mail().as_bytes(), SMTP)
    [ack] = [o for o in rows(engine, Outbox) if o.kind == "acknowledgement"]
    verp_address = f"support+bounce-{ack.verp}@desk.example"
    dsn = Delivery(source="smtp", envelope_from="",
                   recipients=(verp_address,) if by_verp else (DESK,))
    outcome = pipeline.process(bounce_of("postfix_5_1_1.eml", ack, by_verp=by_verp), dsn)
    assert (outcome.outcome, outcome.ticket_id) == ("bounce", 1)
    assert outcome.reason == f"bounce: 5.1.1 for outgoing mail {ack.id}"
    [event] = [e for e in rows(engine, AuditEvent) if e.action == "mail.undeliverable"]
    assert event.ticket_id == 1
    assert json.loads(event.detail)["recipient"] == CUSTOMER
    assert [(o.kind, json.loads(o.recipients)) for o in rows(engine, Outbox)][-1] == (
        "undeliverable", [AGENT]
    )
    assert len(rows(engine, Ticket)) == 1


def test_a_delay_is_noted_and_nothing_else(pipeline: Pipeline, engine: sa.Engine) -> None:
    pipeline.process(customer_mail().as_bytes(), SMTP)
    [ack] = [o for o in rows(engine, Outbox) if o.kind == "acknowledgement"]
    raw = (DSN / "postfix_delayed_4_4_1.eml").read_bytes()
    before = len(rows(engine, Outbox))
    verp = raw.split(b"support+bounce-", 1)[1].split(b"@", 1)[0]
    raw = raw.replace(verp, (ack.verp or "").encode())
    outcome = pipeline.process(raw, Delivery(source="smtp", envelope_from="", recipients=(DESK,)))
    assert outcome.outcome == "bounce" and outcome.reason.startswith("bounce: 4.")
    assert [e.action for e in rows(engine, AuditEvent) if e.action.startswith("mail.")] == [
        "mail.delayed"
    ]
    assert len(rows(engine, Outbox)) == before


@pytest.mark.parametrize("sample", sorted(p.name for p in DSN.glob("*.eml")
                                          if p.name not in ("out_of_office.eml",
                                                            "read_receipt_mdn.eml",
                                                            "customer_pasted_bounce.eml",
                                                            "customer_forwarded_bounce.eml")))
def test_no_bounce_opens_a_ticket_or_gets_an_answer(
    pipeline: Pipeline, engine: sa.Engine, sample: str
) -> None:
    outcome = pipeline.process((DSN / sample).read_bytes(), Delivery(source="imap"))
    assert outcome.outcome == "bounce"
    assert rows(engine, Ticket) == [] and rows(engine, Outbox) == []


def test_a_verification_mail_from_a_no_reply_sender_reaches_only_the_agents(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    code = customer_mail(sender="noreply@slack.com", subject="Slack confirmation code: 481-516",
                         text="Your confirmation code is 481-516.")
    outcome = pipeline.process(code.as_bytes(), SMTP)
    assert (outcome.outcome, outcome.reason) == ("quarantined", "unknown sender")
    assert rows(engine, Ticket) == [] and rows(engine, Outbox) == []


def test_a_customer_account_behind_a_list_opens_no_ticket(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    listed = customer_mail(List_Id="<news.client.example>")
    outcome = pipeline.process(listed.as_bytes(), SMTP)
    assert (outcome.outcome, outcome.reason) == ("quarantined", "automatic sender: list")
    assert rows(engine, Ticket) == [] and rows(engine, Outbox) == []


def test_auto_response_suppress_files_a_ticket_without_acknowledgement(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    mail = customer_mail(X_Auto_Response_Suppress="DR, OOF, AutoReply")
    outcome = pipeline.process(mail.as_bytes(), SMTP)
    assert (outcome.outcome, outcome.reason) == ("ticket", "not acknowledged")
    assert [o.kind for o in rows(engine, Outbox)] == ["new_ticket"]


def test_variants_of_one_stranger_get_one_answer(pipeline: Pipeline, engine: sa.Engine) -> None:
    senders = [f"mallory+{n}@evil.example" for n in range(20)]
    senders += ['"mallory"@evil.example', "MALLORY@EVIL.EXAMPLE", "Mallory@evil.example"]
    for n, sender in enumerate(senders):
        mail = customer_mail(sender=sender, subject=f"hello {n}")
        assert pipeline.process(mail.as_bytes(), SMTP).outcome == "quarantined"
    assert [o.kind for o in rows(engine, Outbox)] == ["unknown_sender"]


def test_answers_to_strangers_stop_at_the_hourly_cap(engine: sa.Engine, tmp_path: Path) -> None:
    pipeline = make_pipeline(engine, tmp_path)
    for n in range(35):
        pipeline.process(customer_mail(sender=f"stranger{n}@elsewhere.example").as_bytes(), SMTP)
    assert len(rows(engine, Outbox)) == 30


def test_strangers_the_trusted_mta_did_not_authenticate_get_no_answer(
    engine: sa.Engine, tmp_path: Path
) -> None:
    pipeline = make_pipeline(engine, tmp_path, trusted_authserv_id=TRUSTED)
    failed = f"{TRUSTED}; dmarc=fail header.from=elsewhere.example"
    passed = f"{TRUSTED}; dmarc=pass header.from=elsewhere.example"
    forged = customer_mail(sender="victim@elsewhere.example", Authentication_Results=failed)
    real = customer_mail(sender="someone@elsewhere.example", Authentication_Results=passed)
    assert pipeline.process(forged.as_bytes(), SMTP).outcome == "quarantined"
    assert pipeline.process(real.as_bytes(), SMTP).outcome == "quarantined"
    assert [json.loads(o.recipients) for o in rows(engine, Outbox)] == [
        ["someone@elsewhere.example"]
    ]


def test_a_mailbox_gets_at_most_the_daily_number_of_automatic_mails(
    engine: sa.Engine, tmp_path: Path
) -> None:
    pipeline = make_pipeline(engine, tmp_path)
    pipeline.settings = pipeline.settings.model_copy(update={
        "limits": LimitsSettings(automatic_per_mailbox_per_day=3, breaker_tickets=50)
    })
    pipeline.notices.settings = pipeline.settings
    outcomes = [pipeline.process(customer_mail(subject=f"Q{n}").as_bytes(), SMTP)
                for n in range(5)]
    assert [o.reason for o in outcomes] == [None, None, None, "not acknowledged",
                                            "not acknowledged"]
    assert len([o for o in rows(engine, Outbox) if o.kind == "acknowledgement"]) == 3


def test_an_oversized_mail_is_quarantined_and_its_sender_told_the_limit(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    head = customer_mail().as_bytes().split(b"\n\n", 1)[0] + b"\n\n"
    size = 30 * 1024 * 1024
    outcome = pipeline.process(head, Delivery(source="imap", uid=9, oversize=size))
    assert (outcome.outcome, outcome.reason) == (
        "quarantined", f"too large ({size} bytes, the limit is {25 * 1024 * 1024})"
    )
    [notice] = rows(engine, Outbox)
    assert (notice.kind, json.loads(notice.recipients)) == ("too_large", [CUSTOMER])
    assert b"25" in composed(notice) and rows(engine, Ticket) == []
    [held] = rows(engine, InboundMail)
    assert held.outcome == "quarantined"


def test_no_value_from_a_mail_or_the_directory_adds_a_header_or_a_recipient(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    with Session(engine) as session:
        account = session.exec(select(Account).where(Account.email == CUSTOMER)).one()
        account.name = "Claire\r\nBcc: evil@attacker.example\x1b[2J"
        session.add(account)
        session.commit()
    mail = customer_mail(
        subject="=?UTF-8?Q?Export=0D=0ABcc:_evil2@attacker.example=00?=",
        sender=CUSTOMER,
    )
    raw = mail.as_bytes().replace(
        f"From: Claire Dupont <{CUSTOMER}>".encode(),
        f"From: =?UTF-8?Q?Claire_A=0D=0ACc:_evil3@attacker.example?= <{CUSTOMER}>".encode(),
    )
    outcome = pipeline.process(raw, SMTP)
    # The display name hides another address: quarantined, and nobody is written to.
    assert (outcome.outcome, outcome.reason) == (
        "quarantined", "ambiguous sender: From display name contains another address"
    )
    plain = customer_mail(subject="=?UTF-8?Q?Export=0D=0ABcc:_evil2@attacker.example=00?=")
    plain.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf",
                         filename="facture.pdf")
    hostile = plain.as_bytes().replace(
        b'filename="facture.pdf"',
        b"filename*=utf-8''facture%0D%0ABcc%3A%20evil4%40attacker.example%00.pdf",
    )
    assert b"evil4" in hostile
    assert pipeline.process(hostile, SMTP).outcome == "ticket"
    sent = rows(engine, Outbox)
    assert {o.kind for o in sent} == {"acknowledgement", "new_ticket"}
    for row in sent:
        parsed = message_from_bytes(composed(row), policy=policy.default)
        assert parsed["Bcc"] is None and parsed["Cc"] is None
        assert len(json.loads(row.recipients)) == 1
        head = composed(row).split(b"\r\n\r\n", 1)[0]
        assert b"\r\nBcc:" not in head and b"\r\nCc:" not in head
        assert b"\x1b" not in composed(row) and b"\x00" not in composed(row)
        to = parsed["To"].addresses
        assert len(to) == 1 and "attacker" not in to[0].addr_spec
