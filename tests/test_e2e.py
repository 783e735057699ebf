"""End to end: `maildesk run` as a process, mail in through Dovecot or SMTP, mail out to SMTP."""

from __future__ import annotations

import smtplib
import threading
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from e2e import (
    AGENT,
    COLLEAGUE,
    CUSTOMER,
    DESK,
    US_AGENT,
    RunningDesk,
    customer_mail,
    running_desk,
)
from rig.dovecot import ImapAccount
from rig.smtp import RecordedMail, RecordingSMTPServer
from sqlalchemy import text

from maildesk.signing import ReplyKey, ReplyKeyring, read_reply_address, verify_reply_token

KEY = ReplyKeyring(ReplyKey("a", b"test-reply-key"))
ORIGINAL_PHRASE = "L'export PDF échoue depuis ce matin"


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"


def by_recipient(mails: list[RecordedMail]) -> dict[str, EmailMessage]:
    return {m.rcpt_tos[0]: message_from_bytes(m.raw, policy=policy.default) for m in mails}  # type: ignore[misc]


def body_text(mail: EmailMessage) -> str:
    part = mail.get_body(preferencelist=("plain",))
    assert part is not None
    return part.get_content()  # type: ignore[no-any-return]


def open_ticket(
    desk: RunningDesk, imap: ImapAccount, smtp: RecordingSMTPServer
) -> dict[str, EmailMessage]:
    """Customer mail in through IMAP; returns the acknowledgement and the agent's copy."""
    imap.append(customer_mail().as_bytes())
    mails = by_recipient(smtp.wait_for(count=2, timeout=30))
    assert set(mails) == {CUSTOMER, AGENT}
    smtp.clear()
    return mails


def test_a_customer_mail_becomes_ticket_1_and_is_acknowledged(
    tmp_path: Path, imap_account: ImapAccount, smtp_server: RecordingSMTPServer
) -> None:
    with running_desk(tmp_path, sqlite_url(tmp_path), imap=imap_account, smtp=smtp_server) as desk:
        original = customer_mail()
        imap_account.append(original.as_bytes())
        mails = by_recipient(smtp_server.wait_for(count=2, timeout=30))
        [ticket] = desk.tickets()
        assert ticket.id == 1
        assert imap_account.wait_for_count("maildesk/processed", 1) and imap_account.uids() == []

    # Only the EU agent: the company has no after-hours subscription, so US staff see nothing.
    assert set(mails) == {CUSTOMER, AGENT}
    ack = mails[CUSTOMER]
    assert ack["From"].addresses[0].addr_spec == DESK
    assert "[#1]" in ack["Subject"]
    assert ack["In-Reply-To"] == original["Message-ID"]
    assert original["Message-ID"] in ack["References"]
    assert ack["Message-ID"].endswith("@desk.example>")
    assert ack["Auto-Submitted"] == "auto-replied"
    assert ack["X-Auto-Response-Suppress"] == "All"
    reply_to = ack["Reply-To"].addresses[0].addr_spec
    signed = read_reply_address(DESK, reply_to)
    assert signed is not None and signed.ticket_id == 1
    today = datetime.now(UTC).date()
    assert verify_reply_token(KEY, signed, principal="account:1", epoch=0, today=today)
    raw = ack.as_string()
    assert ORIGINAL_PHRASE not in raw and "Export PDF en erreur" not in ack["Subject"]
    text_part = body_text(ack)
    for promise in ("Neocase Software", "dpo@neocasesoftware.com", "CNIL", "5 ans",
                    "https://vendor.example/privacy"):
        assert promise in text_part
    agent_copy = mails[AGENT]
    assert ORIGINAL_PHRASE in body_text(agent_copy)
    assert agent_copy["Auto-Submitted"] == "auto-generated"
    # One log line per mail with its outcome, and never a body or a secret.
    log = desk.log_path.read_text(encoding="utf-8")
    [processed] = [e for e in desk.log_events() if e.get("event") == "mail processed"]
    assert (processed["outcome"], processed["ticket"]) == ("ticket", 1)
    for secret in (ORIGINAL_PHRASE, "échoue", "test-reply-key", imap_account.password):
        assert secret not in log


def test_an_agent_answer_reaches_the_customer_from_the_support_address(
    tmp_path: Path, imap_account: ImapAccount, smtp_server: RecordingSMTPServer
) -> None:
    with running_desk(tmp_path, sqlite_url(tmp_path), imap=imap_account, smtp=smtp_server) as desk:
        notification = open_ticket(desk, imap_account, smtp_server)[AGENT]
        reply = EmailMessage(policy=policy.SMTP)
        reply["From"] = f"Alice Martin <{AGENT}>"
        reply["To"] = notification["Reply-To"]
        reply["Subject"] = "RE: " + notification["Subject"]
        reply["Message-ID"] = "<answer-1@vendor.example>"
        reply["In-Reply-To"] = notification["Message-ID"]
        reply.set_content(
            "Bonjour Claire,\n\nLe correctif est déployé, merci de réessayer.\n\nAlice\n\n"
            "De : Support <support@desk.example>\nEnvoyé : vendredi 27 novembre 2026 10:05\n"
            f"À : {AGENT}\nObjet : {notification['Subject']}\n\n{ORIGINAL_PHRASE}\n"
        )
        imap_account.append(reply.as_bytes())
        [relayed] = smtp_server.wait_for(count=1, timeout=30)
        thread = desk.messages(1)

    assert relayed.rcpt_tos == [CUSTOMER]
    answer = message_from_bytes(relayed.raw, policy=policy.default)
    sender = answer["From"].addresses[0]
    assert (sender.display_name, sender.addr_spec) == ("Alice Martin via Support", DESK)
    assert AGENT not in str(answer["From"]) and AGENT not in str(answer["Reply-To"])
    assert "Auto-Submitted" not in answer
    body = body_text(answer)
    assert "Le correctif est déployé" in body
    assert ORIGINAL_PHRASE not in body and "Envoyé :" not in body
    assert "dpo@neocasesoftware.com" in body
    assert [m.author_kind for m in thread] == ["customer", "agent"]
    assert thread[1].matched_by == "reply_address"


@pytest.mark.parametrize("signal", ["reply_address", "in_reply_to", "subject_tag"])
def test_a_customer_reply_lands_on_the_same_ticket(
    tmp_path: Path, imap_account: ImapAccount, smtp_server: RecordingSMTPServer, signal: str
) -> None:
    with running_desk(tmp_path, sqlite_url(tmp_path), imap=imap_account, smtp=smtp_server) as desk:
        ack = open_ticket(desk, imap_account, smtp_server)[CUSTOMER]
        # Each signal alone: the other two are absent from the reply.
        if signal == "reply_address":
            reply = customer_mail(subject="Encore moi", to=ack["Reply-To"], text="Toujours KO.")
        elif signal == "in_reply_to":
            reply = customer_mail(subject="Encore moi", text="Toujours KO.",
                                  In_Reply_To=ack["Message-ID"])
        else:
            reply = customer_mail(subject="Re: [#1] suite", text="Toujours KO.")
        imap_account.append(reply.as_bytes())
        [followup] = smtp_server.wait_for(count=1, timeout=30)
        tickets = desk.tickets()
        thread = desk.messages(1)

    assert len(tickets) == 1
    assert [m.matched_by for m in thread] == [None, signal]
    assert followup.rcpt_tos == [AGENT]
    assert "Toujours KO." in body_text(message_from_bytes(followup.raw, policy=policy.default))


def test_a_colleague_may_follow_up_by_subject_but_a_stranger_may_not(
    tmp_path: Path, imap_account: ImapAccount, smtp_server: RecordingSMTPServer
) -> None:
    with running_desk(tmp_path, sqlite_url(tmp_path), imap=imap_account, smtp=smtp_server) as desk:
        open_ticket(desk, imap_account, smtp_server)
        imap_account.append(customer_mail(subject="[#1] me too", sender=COLLEAGUE).as_bytes())
        imap_account.append(
            customer_mail(subject="[#1] let me in", sender="eve@evil.example").as_bytes()
        )
        desk.wait_for_inbound(3)
        thread = desk.messages(1)
    assert [m.author_email for m in thread] == [CUSTOMER, COLLEAGUE]


def test_unknown_senders_get_one_generic_answer_a_day(
    tmp_path: Path, imap_account: ImapAccount, smtp_server: RecordingSMTPServer
) -> None:
    with running_desk(tmp_path, sqlite_url(tmp_path), imap=imap_account, smtp=smtp_server) as desk:
        stranger = "eve@elsewhere.example"
        imap_account.append(customer_mail(sender=stranger).as_bytes())
        [answer] = smtp_server.wait_for(count=1, timeout=30)
        imap_account.append(customer_mail(sender=stranger, subject="again").as_bytes())
        inbound = desk.wait_for_inbound(2)
        imap_account.wait_for_count("maildesk/quarantine", 2)
        answers = desk.outbox("unknown_sender")
        tickets = desk.tickets()

    assert tickets == []
    assert [(m.outcome, m.reason) for m in inbound] == [("quarantined", "unknown sender")] * 2
    assert len(answers) == 1 and len(smtp_server.mails) == 1
    assert answer.rcpt_tos == [stranger]
    raw = answer.raw.decode("utf-8", "replace")
    assert ORIGINAL_PHRASE not in raw and "Export PDF" not in raw


def test_an_outlook_out_of_office_reply_gets_no_answer(
    tmp_path: Path, imap_account: ImapAccount, smtp_server: RecordingSMTPServer
) -> None:
    ooo = (Path(__file__).parent / "data" / "outlook_out_of_office.eml").read_bytes()
    with running_desk(tmp_path, sqlite_url(tmp_path), imap=imap_account, smtp=smtp_server) as desk:
        imap_account.append(ooo)
        [inbound] = desk.wait_for_inbound(1)
        outbox = desk.outbox()
        tickets = desk.tickets()
    assert (inbound.outcome, inbound.reason) == ("ignored", "automatic: auto-submitted")
    assert outbox == [] and tickets == [] and smtp_server.mails == []


def test_a_malformed_mail_is_quarantined_and_the_next_one_processed(
    tmp_path: Path, imap_account: ImapAccount, smtp_server: RecordingSMTPServer
) -> None:
    garbage = (Path(__file__).parent / "data" / "malformed_no_from.eml").read_bytes()
    with running_desk(tmp_path, sqlite_url(tmp_path), imap=imap_account, smtp=smtp_server) as desk:
        imap_account.append(garbage)
        imap_account.append(customer_mail().as_bytes())
        smtp_server.wait_for(count=2, timeout=30)
        inbound = desk.wait_for_inbound(2)
        imap_account.wait_for_count("maildesk/quarantine", 1)
    assert inbound[0].outcome == "quarantined" and inbound[0].reason.startswith("malformed")  # type: ignore[union-attr]
    assert inbound[1].outcome == "ticket"


def test_the_same_flows_through_the_smtp_listener(
    tmp_path: Path, smtp_server: RecordingSMTPServer
) -> None:
    with running_desk(tmp_path, sqlite_url(tmp_path), imap=None, smtp=smtp_server) as desk:
        with smtplib.SMTP("127.0.0.1", desk.listener_port) as client:
            client.send_message(customer_mail())
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                client.send_message(customer_mail(to="someone@else.example"))
        mails = by_recipient(smtp_server.wait_for(count=2, timeout=30))
        smtp_server.clear()
        reply = customer_mail(subject="Encore", text="Toujours KO.",
                              In_Reply_To=mails[CUSTOMER]["Message-ID"])
        with smtplib.SMTP("127.0.0.1", desk.listener_port) as client:
            client.send_message(reply)
        smtp_server.wait_for(count=1, timeout=30)
        with smtplib.SMTP("127.0.0.1", desk.listener_port) as client:
            client.send_message(customer_mail(sender="nobody@nowhere.example"))
        smtp_server.wait_for(count=2, timeout=30)
        thread = desk.messages(1)
        tickets = desk.tickets()
    assert len(tickets) == 1
    assert [m.matched_by for m in thread] == [None, "in_reply_to"]
    assert smtp_server.mails[-1].rcpt_tos == ["nobody@nowhere.example"]


def test_mail_leaves_the_inbox_only_after_its_ticket_is_committed(
    tmp_path: Path, imap_account: ImapAccount, smtp_server: RecordingSMTPServer, postgres_url: str
) -> None:
    with running_desk(tmp_path, postgres_url, imap=imap_account, smtp=smtp_server) as desk:
        # Hold a lock that the ticket's transaction needs: the pipeline blocks inside it.
        with desk.engine.connect() as blocker:
            blocker.execute(text("LOCK TABLE ticket IN ACCESS EXCLUSIVE MODE"))
            imap_account.append(customer_mail().as_bytes())
            listener_result: list[object] = []

            def send_by_smtp() -> None:
                with smtplib.SMTP("127.0.0.1", desk.listener_port) as client:
                    listener_result.append(client.send_message(customer_mail(subject="SMTP")))

            sender = threading.Thread(target=send_by_smtp)
            sender.start()
            # Both mails reach the pipeline and wait on the lock; the events come from the
            # database itself, so the wait needs no sleep.
            _wait_for_blocked(desk, 2)
            assert imap_account.uids("INBOX") != []
            assert listener_result == []
            blocker.rollback()
        sender.join(timeout=30)
        assert listener_result == [{}]
        imap_account.wait_for_count("maildesk/processed", 1)
        assert imap_account.uids("INBOX") == []
        assert len(desk.tickets()) == 2
        # The IMAP mail and the SMTP mail: two tickets, both committed before the move and 250.


def _wait_for_blocked(desk: RunningDesk, count: int) -> None:
    """Wait until `count` database sessions wait on a lock."""
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with desk.engine.connect() as probe:
            waiting = probe.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            ).scalar()
        if waiting is not None and waiting >= count:
            return
        time.sleep(0.05)
    raise AssertionError("the pipeline never waited on the lock")


def test_us_agents_get_tickets_of_after_hours_companies(
    tmp_path: Path, smtp_server: RecordingSMTPServer
) -> None:
    with running_desk(tmp_path, sqlite_url(tmp_path), imap=None, smtp=smtp_server,
                      after_hours=True) as desk:
        with smtplib.SMTP("127.0.0.1", desk.listener_port) as client:
            client.send_message(customer_mail())
        mails = by_recipient(smtp_server.wait_for(count=3, timeout=30))
    assert set(mails) == {CUSTOMER, AGENT, US_AGENT}
