"""Classify: which mails are automatic, by the rule that says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from maildesk.mail.message import Delivery
from maildesk.mail.parse import parse_mail
from maildesk.rules.classify import automatic_reason, suppresses_auto_reply

DATA = Path(__file__).parent.parent / "data"
IMAP = Delivery(source="imap")


def mail(*headers: str, content_type: str = "text/plain") -> bytes:
    head = "\r\n".join(["From: Claire <claire@client.example>", "To: support@desk.example",
                        "Subject: hello", f"Content-Type: {content_type}", *headers])
    return f"{head}\r\n\r\nBonjour\r\n".encode()


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ((), None),
        (("Auto-Submitted: no",), None),
        (("Auto-Submitted: auto-replied",), "auto-submitted"),
        (("Auto-Submitted: auto-generated; owner-email=x@y.example",), "auto-submitted"),
        (("Precedence: bulk",), "precedence"),
        (("Precedence: list",), "precedence"),
        (("List-Id: <users.lists.example>",), "list"),
        (("Return-Path: <>",), "null-return-path"),
        (("X-Autoreply: yes",), "vendor-autoreply"),
        (("Precedence: junk",), "precedence"),
        (("Precedence: auto_reply",), "precedence-auto-reply"),
        (("List-Unsubscribe: <mailto:leave@lists.example>",), "list"),
        (("List-Post: <mailto:users@lists.example>",), "list"),
        (("X-Loop: support@desk.example",), "loop"),
        (("X-Maildesk-Loop: other-desk.example",), "loop"),
        (("Message-ID: <1764672000.4242.1234567890.maildesk@other-desk.example>",),
         "own-message-id"),
        # A person's mail whose Message-ID merely shares a domain is not ours.
        (("Message-ID: <CAF3x=abc@desk.example>",), None),
        (("X-Auto-Response-Suppress: OOF",), None),
    ],
)
def test_automatic_mail_rules(headers: tuple[str, ...], reason: str | None) -> None:
    assert automatic_reason(parse_mail(mail(*headers)), IMAP) == reason


def test_bounces_are_automatic() -> None:
    report = mail(content_type='multipart/report; report-type=delivery-status; boundary="b"')
    assert automatic_reason(parse_mail(report), IMAP) == "report"
    smtp_bounce = Delivery(source="smtp", envelope_from="")
    assert automatic_reason(parse_mail(mail()), smtp_bounce) == "null-return-path"


def test_an_outlook_out_of_office_reply_is_automatic() -> None:
    ooo = parse_mail((DATA / "outlook_out_of_office.eml").read_bytes())
    assert automatic_reason(ooo, IMAP) == "auto-submitted"


def test_client_samples_are_written_by_people() -> None:
    for sample in ("gmail_fr_utf8_base64.eml", "thunderbird_fr_flowed_latin1.eml",
                   "outlook_fr_windows1252_qp.eml", "apple_mail_related_inline_image.eml"):
        assert automatic_reason(parse_mail((DATA / sample).read_bytes()), IMAP) is None, sample


@pytest.mark.parametrize(
    ("sender", "reason"),
    [
        ("MAILER-DAEMON@mx.client.example", "daemon-sender"),
        ("postmaster@client.example", "daemon-sender"),
        ("noreply@slack.com", "noreply-sender"),
        ("no-reply@accounts.google.com", "noreply-sender"),
        ("no_reply@client.example", "noreply-sender"),
        ("donotreply@client.example", "noreply-sender"),
        ("do-not-reply@client.example", "noreply-sender"),
        ("noreply-billing@client.example", "noreply-sender"),
        ("bounces+12345@mail.client.example", "noreply-sender"),
        ("norbert@client.example", None),
        ("replyto@client.example", None),
    ],
)
def test_machine_senders(sender: str, reason: str | None) -> None:
    raw = mail().replace(b"Claire <claire@client.example>", sender.encode())
    assert automatic_reason(parse_mail(raw), IMAP) == reason


@pytest.mark.parametrize(
    ("value", "suppressed"),
    [("All", True), ("OOF, AutoReply", True), ("DR, RN, NRN, OOF, AutoReply", True),
     ("autoreply", True), ("DR, RN", False), ("", False)],
)
def test_auto_response_suppress_asks_for_no_acknowledgement(value: str, suppressed: bool) -> None:
    headers = (f"X-Auto-Response-Suppress: {value}",) if value else ()
    assert suppresses_auto_reply(parse_mail(mail(*headers))) is suppressed
