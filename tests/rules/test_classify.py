"""Classify: which mails are automatic, by the rule that says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from maildesk.mail.message import Delivery
from maildesk.mail.parse import parse_mail
from maildesk.rules.classify import authentication_failure, automatic_reason

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


def test_authentication_results_from_the_trusted_server_only() -> None:
    trusted = "mx.desk.example"
    passed = parse_mail(
        mail(f"Authentication-Results: {trusted}; dmarc=pass header.from=client.example")
    )
    forged = parse_mail(mail("Authentication-Results: mx.evil.example; dmarc=pass"))
    failed = parse_mail(mail(f"Authentication-Results: {trusted}; spf=fail; dkim=none; dmarc=fail"))
    assert authentication_failure(passed, None) is None
    assert authentication_failure(passed, trusted) is None
    assert authentication_failure(forged, trusted) == f"no Authentication-Results from {trusted}"
    assert "not authenticated" in (authentication_failure(failed, trusted) or "")
