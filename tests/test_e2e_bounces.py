"""Bounces end to end: thirteen real DSNs of our acknowledgements, through the listener.

A customer opens one ticket per sample; each acknowledgement is captured at the relay with its
Message-ID and its VERP return path. Each sample of tests/data/dsn is then rewritten to name
that mail, either by its return path (the DSN goes to support+bounce-<token>@, as a relay sends
it) or by the original's Message-ID alone (the DSN reaches the plain desk address, as after a
relay that rewrote the envelope), and delivered to the running daemon. Every sample must be
matched to its ticket and recorded there, open no ticket, and get no answer: the relay sees only
the agents' notice of a mail lost for good.
"""

from __future__ import annotations

import json
import re
import smtplib
import time
from pathlib import Path

from e2e import AGENT, CUSTOMER, DESK, RunningDesk, customer_mail, running_desk
from rig.smtp import RecordedMail, RecordingSMTPServer
from sqlmodel import col, select

from maildesk.mail.parse import parse_mail
from maildesk.store.models import RECEIVED, AuditEvent, InboundMail

DSN = Path(__file__).parent / "data" / "dsn"
UNDELIVERABLE, DELAYED = "mail.undeliverable", "mail.delayed"

# (sample, how it names our mail, the (audit action, recipient, status) it must record).
# The action follows the store's rule: a 5.x.x status, or "failed" whatever the status
# (Postfix giving up with its last 4.4.1), is undeliverable; a 4.x.x still being tried, delayed.
SAMPLES = [
    ("postfix_5_1_1", "verp", [(UNDELIVERABLE, "paul.leroy@client.example", "5.1.1")]),
    ("postfix_delayed_4_4_1", "verp",
     [(DELAYED, "Sophie.Bernard@atelier-nord.example", "4.4.1")]),
    ("postfix_expired_4_4_1", "message-id",
     [(UNDELIVERABLE, "Sophie.Bernard@atelier-nord.example", "4.4.1")]),
    ("exim_plain", "verp", [(UNDELIVERABLE, "lucas.girard@client.example", "5.2.2")]),
    ("exim_report", "message-id", [(UNDELIVERABLE, "nathalie.robin@client.example", "5.7.1")]),
    ("exchange_ndr", "message-id",
     [(UNDELIVERABLE, "j.garnier@garnier-btp.example", "5.1.1")]),
    ("office365_ndr", "verp", [(UNDELIVERABLE, "e.vidal@groupe-vidal.example", "5.1.10")]),
    ("gmail_address_not_found", "message-id",
     [(UNDELIVERABLE, "hugo.lambert@client.example", "5.1.1")]),
    ("gmail_delayed", "verp", [(DELAYED, "lea.marchand@cabinet-marchand.example", "4.2.2")]),
    ("qmail_plain", "message-id",
     [(UNDELIVERABLE, "marc.petit@client-bis.example", "5.1.1")]),
    ("sendmail_report", "verp",
     [(UNDELIVERABLE, "contact@fontaine-associes.example", "5.1.1")]),
    ("headers_only", "message-id",
     [(UNDELIVERABLE, "A.Roux@mairie-exemple.example", "5.2.1")]),
    ("two_recipients", "verp", [(UNDELIVERABLE, "ines.faure@client.example", "5.1.1"),
                                (DELAYED, "paul.leroy@client.example", "4.2.1")]),
]
# Each acknowledgement is automatic mail to one customer: the default limits would stop them
# after ten tickets, which is not what this test is about.
LIMITS = "[limits]\nbreaker_tickets = 100\nautomatic_per_mailbox_per_day = 100\n"

# Where the samples name the mail that failed: its VERP return path and its Message-ID.
_SAMPLE_VERP = re.compile(rb"support\+bounce-[0-9a-f]{16}@desk\.example", re.I)
_SAMPLE_ID = re.compile(rb"<\d+\.\d+\.\d+\.maildesk@desk\.example>")
_TAG = re.compile(r"\[#(\d+)\]")


def test_the_shapes_include_the_big_mtas() -> None:
    names = {name for name, _mode, _events in SAMPLES}
    assert len(names) >= 10
    assert {"postfix_5_1_1", "exim_report", "exchange_ndr", "gmail_address_not_found"} <= names
    assert {mode for _name, mode, _events in SAMPLES} == {"verp", "message-id"}


def rewrite(name: str, mode: str, ack: RecordedMail) -> tuple[bytes, str]:
    """The sample naming our acknowledgement, and the envelope recipient to deliver it to."""
    raw = (DSN / f"{name}.eml").read_bytes()
    if mode == "verp":
        assert _SAMPLE_VERP.search(raw), f"{name}: no VERP address to rewrite"
        return _SAMPLE_VERP.sub(ack.mail_from.encode(), raw), ack.mail_from
    assert _SAMPLE_ID.search(raw), f"{name}: no original Message-ID to rewrite"
    return _SAMPLE_ID.sub(str(ack.message["Message-ID"]).encode(), raw), DESK


def ticket_tag(mail: RecordedMail) -> int | None:
    """The ticket that a mail's subject names with its [#N] tag."""
    found = _TAG.search(str(mail.message["Subject"]))
    return int(found.group(1)) if found else None


def settle(desk: RunningDesk, received: int, timeout: float = 20) -> None:
    """Wait until `received` mails are filed and the outbox has nothing left to send."""
    deadline = time.monotonic() + timeout
    while True:
        with desk.session() as session:
            filed = session.exec(select(InboundMail).where(InboundMail.outcome != RECEIVED))
            done = len(filed.all()) >= received
        if done and not any(row.status in ("pending", "sending") for row in desk.outbox()):
            return
        assert time.monotonic() < deadline, f"{received} mails were not filed and sent in time"
        time.sleep(0.05)


def test_real_dsns_are_matched_recorded_and_never_answered(
    tmp_path: Path, smtp_server: RecordingSMTPServer
) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    with running_desk(tmp_path, url, imap=None, smtp=smtp_server, extra=LIMITS) as desk:
        with smtplib.SMTP("127.0.0.1", desk.listener_port) as client:
            for name, _mode, _events in SAMPLES:
                client.send_message(customer_mail(subject=f"Échantillon {name}"))
        settle(desk, len(SAMPLES))
        ticket_of = {t.subject.removeprefix("Échantillon "): t.id for t in desk.tickets()}
        assert sorted(ticket_of) == sorted(name for name, _mode, _events in SAMPLES)
        acks = {}
        for mail in smtp_server.mails:
            if mail.rcpt_tos == [CUSTOMER]:
                tag = ticket_tag(mail)
                assert tag is not None and mail.mail_from.startswith("support+bounce-")
                acks[tag] = mail
        assert sorted(acks) == sorted(ticket_of.values())
        smtp_server.clear()

        own_ids = {}
        with smtplib.SMTP("127.0.0.1", desk.listener_port) as client:
            for name, mode, _events in SAMPLES:
                raw, rcpt = rewrite(name, mode, acks[ticket_of[name]])
                own_ids[name] = parse_mail(raw).message_id
                client.sendmail("", [rcpt], raw)
        settle(desk, 2 * len(SAMPLES))

        with desk.session() as session:
            inbound = {m.message_id: m for m in session.exec(select(InboundMail))}
            events = list(session.exec(
                select(AuditEvent)
                .where(col(AuditEvent.action).in_((UNDELIVERABLE, DELAYED)))
                .order_by(col(AuditEvent.id))
            ))
        notices = {row.message_id: row for row in desk.outbox("undeliverable")}
        problems = []
        for name, _mode, expected in SAMPLES:
            ticket_id, filed = ticket_of[name], inbound.get(own_ids[name])
            if filed is None or (filed.outcome, filed.ticket_id) != ("bounce", ticket_id):
                seen = (filed.outcome, filed.ticket_id, filed.reason) if filed else "not filed"
                problems.append(f"{name}: expected a bounce on ticket #{ticket_id}, got {seen}")
                continue
            recorded = [
                (e.action, json.loads(e.detail or "{}").get("recipient"),
                 json.loads(e.detail or "{}").get("status"))
                for e in events if e.ticket_id == ticket_id
            ]
            if recorded != expected:
                problems.append(f"{name}: recorded {recorded}, expected {expected}")
            told = sorted(row.message_id for row in notices.values() if row.ticket_id == ticket_id)
            lost = [recipient for action, recipient, _ in expected if action == UNDELIVERABLE]
            if len(told) != len(lost):
                problems.append(f"{name}: {len(told)} notices to agents, expected {len(lost)}")
            relayed = sorted(str(m.message["Message-ID"]) for m in smtp_server.mails
                             if ticket_tag(m) == ticket_id)
            if relayed != told:
                problems.append(f"{name}: the relay got {relayed}, expected the notices {told}")
        assert not problems, "\n".join(problems)

        # No DSN opened a ticket, and nothing went back to a mailer daemon: only the agent's
        # notices left, one per recipient lost for good.
        assert len(desk.tickets()) == len(SAMPLES)
        assert [m.rcpt_tos for m in smtp_server.mails] == [[AGENT]] * len(notices)
        assert len(notices) == sum(
            action == UNDELIVERABLE for _name, _mode, events_ in SAMPLES for action, _, _ in events_
        )
