"""Tests for bounce recognition: the DSN corpus in tests/data/dsn, the fallbacks and the bounds."""

from __future__ import annotations

import email.policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from pathlib import Path

import pytest

from maildesk.mail.bounce import MAX_TEXT, read_bounce, verp_token
from maildesk.mail.message import ParsedMail
from maildesk.mail.parse import parse_mail

DSN = Path(__file__).parent.parent / "data" / "dsn"


def load(name: str) -> ParsedMail:
    """Parse one sample of the DSN corpus."""
    return parse_mail((DSN / f"{name}.eml").read_bytes())


def ours(n: str) -> str:
    """A Message-ID as maildesk makes them (make_msgid with the "maildesk" idstring)."""
    return f"<{n}.maildesk@desk.example>"


# One row per bounce of the corpus: the original's Message-ID that comes first, what each
# recipient group says as (address, status, action), the permanent flag of each, the MTA.
BOUNCES = [
    ("postfix_5_1_1", ours("176489721201.12345.4242424242424242424"),
     [("paul.leroy@client.example", "5.1.1", "failed")], [True], "relay.desk.example"),
    # The domain is lowercased, the local part kept as the customer wrote it.
    ("postfix_delayed_4_4_1", ours("176489512877.12345.8137260451928374650"),
     [("Sophie.Bernard@atelier-nord.example", "4.4.1", "delayed")], [False],
     "relay.desk.example"),
    # Postfix gives up after the queue lifetime with the last temporary status: the action
    # says failed, the status class is still 4, so `permanent` (class 5) is False.
    ("postfix_expired_4_4_1", ours("176446310455.12345.1029384756102938475"),
     [("Sophie.Bernard@atelier-nord.example", "4.4.1", "failed")], [False],
     "relay.desk.example"),
    ("exim_plain", ours("176490118532.12345.5566778899001122334"),
     [("lucas.girard@client.example", "5.2.2", "failed")], [True], None),
    # Exim always writes Status: 5.0.0; its Diagnostic-Code says 5.7.1.
    ("exim_report", ours("176490422019.12345.9182736450918273645"),
     [("nathalie.robin@client.example", "5.7.1", "failed")], [True], "mx.hebergeur.example"),
    ("exchange_ndr", ours("176490002402.12345.1357913579135791357"),
     [("j.garnier@garnier-btp.example", "5.1.1", "failed")], [True],
     "exch01.corp.garnier-btp.example"),
    ("office365_ndr", ours("176490616811.12345.2468024680246802468"),
     [("e.vidal@groupe-vidal.example", "5.1.10", "failed")], [True],
     "am8pr09mb5731.eurprd09.prod.outlook.com"),
    ("gmail_address_not_found", ours("176490793833.12345.1122334455667788990"),
     [("hugo.lambert@client.example", "5.1.1", "failed")], [True], "googlemail.com"),
    ("gmail_delayed", ours("176491024750.12345.6655443322110099887"),
     [("lea.marchand@cabinet-marchand.example", "4.2.2", "delayed")], [False], "googlemail.com"),
    ("qmail_plain", ours("176491229104.12345.7777333311119999555"),
     [("marc.petit@client-bis.example", "5.1.1", "failed")], [True], "mail.client-bis.example"),
    # Final-Recipient is the alias we wrote to, not the mailbox it expanded to.
    ("sendmail_report", ours("176492566003.12345.3141592653589793238"),
     [("contact@fontaine-associes.example", "5.1.1", "failed")], [True],
     "smtp.fontaine-associes.example"),
    ("headers_only", ours("176492810644.12345.2718281828459045235"),
     [("A.Roux@mairie-exemple.example", "5.2.1", "failed")], [True],
     "mail.mairie-exemple.example"),
    ("two_recipients", ours("176493107290.12345.1618033988749894848"),
     [("ines.faure@client.example", "5.1.1", "failed"),
      ("paul.leroy@client.example", "4.2.1", "delayed")], [True, False],
     "smtp2.client.example"),
]

# A read receipt, an out-of-office reply, and a customer's own mail about a bounce (pasted as
# text, or forwarded as an attached message) are no bounce of ours.
NOT_BOUNCES = [
    "read_receipt_mdn", "out_of_office", "customer_pasted_bounce", "customer_forwarded_bounce",
]


@pytest.mark.parametrize(
    ("name", "first_id", "recipients", "permanent", "mta"), BOUNCES, ids=[r[0] for r in BOUNCES]
)
def test_corpus_bounce(
    name: str, first_id: str, recipients: list[tuple[str, str, str]], permanent: list[bool],
    mta: str | None,
) -> None:
    bounce = read_bounce(load(name))
    assert bounce is not None
    assert bounce.original_message_ids[0] == first_id
    assert [(r.address, r.status, r.action) for r in bounce.recipients] == recipients
    assert [r.permanent for r in bounce.recipients] == permanent
    assert bounce.reporting_mta == mta


@pytest.mark.parametrize("name", NOT_BOUNCES)
def test_corpus_not_bounce(name: str) -> None:
    assert read_bounce(load(name)) is None


def test_corpus_table_names_every_file() -> None:
    files = sorted(path.stem for path in DSN.glob("*.eml"))
    assert len(files) >= 12
    # Every file has exactly one row, so neither the table nor the corpus can shrink unseen.
    assert files == sorted([row[0] for row in BOUNCES] + NOT_BOUNCES)


@pytest.mark.parametrize(
    ("name", "diagnostic"),
    [
        # The Diagnostic-Code, unfolded, its "smtp;" type dropped.
        ("postfix_5_1_1", "550 5.1.1 <paul.leroy@client.example>: Recipient address rejected: "
         "User unknown in virtual mailbox table"),
        ("postfix_delayed_4_4_1",
         "connect to mx.atelier-nord.example[203.0.113.80]:25: Connection timed out"),
        # No Diagnostic-Code in Exchange's report: the text's "Remote Server returned" says it.
        ("exchange_ndr", "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found"),
        # Plain-text bounces: the line with the code, from the SMTP reply on.
        ("exim_plain", "552 5.2.2 <lucas.girard@client.example>: Mailbox full"),
        ("qmail_plain", "Sorry, no mailbox here by that name. (#5.1.1)"),
    ],
)
def test_diagnostic(name: str, diagnostic: str) -> None:
    bounce = read_bounce(load(name))
    assert bounce is not None
    assert bounce.recipients[0].diagnostic == diagnostic


@pytest.mark.parametrize(
    ("name", "ids"),
    [
        # In-Reply-To repeats the original; References, naming the customer's mail, is left out.
        ("exchange_ndr", (ours("176490002402.12345.1357913579135791357"),)),
        # The quoted original's own In-Reply-To (the customer's mail) is not taken.
        ("exim_plain", (ours("176490118532.12345.5566778899001122334"),)),
        ("qmail_plain", (ours("176491229104.12345.7777333311119999555"),)),
        # Folded onto a line of its own in the returned headers.
        ("headers_only", (ours("176492810644.12345.2718281828459045235"),)),
    ],
)
def test_original_message_ids(name: str, ids: tuple[str, ...]) -> None:
    bounce = read_bounce(load(name))
    assert bounce is not None
    assert bounce.original_message_ids == ids


def _without(name: str, *content_types: str) -> ParsedMail:
    """A corpus mail with the parts of the given types removed, parsed again."""
    msg = BytesParser(policy=email.policy.default).parsebytes((DSN / f"{name}.eml").read_bytes())

    removed: list[str] = []

    def prune(part: Message) -> None:
        # Multiparts only: the original inside message/rfc822 stays whole.
        payload = part.get_payload()
        if part.get_content_maintype() == "multipart" and isinstance(payload, list):
            kept: list[Message[str, str] | str] = []
            for sub in payload:
                if isinstance(sub, Message) and sub.get_content_type() in content_types:
                    removed.append(sub.get_content_type())
                elif isinstance(sub, Message):
                    prune(sub)
                    kept.append(sub)
            part.set_payload(kept)

    prune(msg)
    assert sorted(removed) == sorted(content_types)
    return parse_mail(msg.as_bytes())


def test_report_without_status_part_is_read_from_its_text() -> None:
    bounce = read_bounce(_without("two_recipients", "message/delivery-status"))
    assert bounce is not None
    assert [(r.address, r.status, r.action) for r in bounce.recipients] == [
        ("ines.faure@client.example", "5.1.1", "failed"),
        ("paul.leroy@client.example", "4.2.1", "delayed"),
    ]
    assert bounce.original_message_ids[0] == ours("176493107290.12345.1618033988749894848")


def test_report_with_only_html_is_read_from_the_html() -> None:
    mail = _without("office365_ndr", "message/delivery-status", "text/plain")
    bounce = read_bounce(mail)
    assert bounce is not None
    assert [(r.address, r.status, r.action) for r in bounce.recipients] == [
        ("e.vidal@groupe-vidal.example", "5.1.10", "failed")
    ]


def test_postfix_delay_warning_text_alone_is_a_delay() -> None:
    bounce = read_bounce(_without("postfix_delayed_4_4_1", "message/delivery-status"))
    assert bounce is not None
    # No code in the text: the class comes from "THIS IS A WARNING ONLY".
    assert [(r.address, r.status, r.action) for r in bounce.recipients] == [
        ("Sophie.Bernard@atelier-nord.example", "4.0.0", "delayed")
    ]


def _plain_bounce(text: str, cte: str) -> ParsedMail:
    """An Exim-style plain-text bounce of the given body, sent with a transfer encoding."""
    msg = EmailMessage()
    msg["From"] = "Mail Delivery System <Mailer-Daemon@mail.client.example>"
    msg["To"] = "support+bounce-c41d8e7f20a96b35@desk.example"
    msg["Subject"] = "Mail delivery failed: returning message to sender"
    msg["Message-ID"] = "<E1vRk2P-0004Xa-3J@mail.client.example>"
    msg["Auto-Submitted"] = "auto-replied"
    msg.set_content(text, charset="us-ascii", cte=cte)
    return parse_mail(msg.as_bytes())


@pytest.mark.parametrize("cte", ["7bit", "quoted-printable", "base64"])
def test_two_megabyte_bounce_is_read_within_the_bounds(cte: str) -> None:
    head = (
        "This message was created automatically by mail delivery software.\n\n"
        "A message that you sent could not be delivered to one or more of its\n"
        "recipients. This is a permanent error. The following address(es) failed:\n\n"
        "  lucas.girard@client.example\n"
        "    550 5.1.1 <lucas.girard@client.example>: User unknown\n\n"
        f"Message-ID: {ours('176490118532.12345.5566778899001122334')}\n\n"
    )
    # No copy marker: were the whole text read, the address at its end would be a recipient.
    filler = "All work and no play makes a bounce a dull mail, again and again.\n" * 32_000
    tail = "  someone.else@client.example\n    550 5.1.1 User unknown\n"
    text = head + filler + tail
    assert len(text) > 2 * 1024 * 1024 and len(head) < MAX_TEXT
    bounce = read_bounce(_plain_bounce(text, cte))
    assert bounce is not None
    assert [(r.address, r.status, r.action) for r in bounce.recipients] == [
        ("lucas.girard@client.example", "5.1.1", "failed")
    ]
    assert bounce.original_message_ids == (ours("176490118532.12345.5566778899001122334"),)


def _report(groups: str, report_type: str = "delivery-status") -> bytes:
    """A minimal Postfix-style report holding the given per-recipient groups."""
    return (
        "From: MAILER-DAEMON@relay.desk.example (Mail Delivery System)\n"
        "To: support+bounce-3f9a1c2e7b4d8a60@desk.example\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        "Message-Id: <20251205011334.4dNq2G3vPmz9sVw@relay.desk.example>\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type={report_type}; boundary="b"\n\n'
        "--b\nContent-Type: text/plain; charset=us-ascii\n\n"
        "This is the mail system at host relay.desk.example.\n\n"
        f"--b\nContent-Type: message/{report_type}\n\n"
        "Reporting-MTA: dns; relay.desk.example\n\n"
        f"{groups}\n"
        "--b\nContent-Type: text/rfc822-headers\n\n"
        f"Message-ID: {ours('176489721201.12345.4242424242424242424')}\n"
        "From: Support <support@desk.example>\n\n"
        "--b--\n"
    ).encode()


def test_recipient_groups_are_bounded() -> None:
    groups = "".join(
        f"Final-Recipient: rfc822; user{n}@client.example\nAction: failed\nStatus: 5.1.1\n\n"
        for n in range(60)
    )
    bounce = read_bounce(parse_mail(_report(groups)))
    assert bounce is not None
    assert [r.address for r in bounce.recipients] == [
        f"user{n}@client.example" for n in range(50)
    ]


def test_global_delivery_status() -> None:
    # RFC 6533: the email package leaves the recipient groups in the body of the first block.
    groups = (
        "Final-Recipient: utf-8; andré.müller@client.example\nAction: failed\nStatus: 5.1.1\n\n"
        "Final-Recipient: rfc822; paul.leroy@client.example\nAction: delayed\nStatus: 4.4.1\n\n"
    )
    raw = _report(groups, "global-delivery-status")
    bounce = read_bounce(parse_mail(raw))
    assert bounce is not None
    assert [(r.address, r.status, r.action) for r in bounce.recipients] == [
        ("andré.müller@client.example", "5.1.1", "failed"),
        ("paul.leroy@client.example", "4.4.1", "delayed"),
    ]


def test_status_and_action_filled_in_from_each_other() -> None:
    groups = (
        "Final-Recipient: rfc822; a@client.example\nAction: failed\n"
        "Diagnostic-Code: smtp; 554 rejected by policy\n\n"
        "Final-Recipient: rfc822; b@client.example\nAction: delayed\n\n"
        "Final-Recipient: rfc822; c@client.example\nStatus: 4.7.1 (greylisted)\n\n"
    )
    bounce = read_bounce(parse_mail(_report(groups)))
    assert bounce is not None
    assert [(r.address, r.status, r.action) for r in bounce.recipients] == [
        ("a@client.example", "5.0.0", "failed"),
        ("b@client.example", "4.0.0", "delayed"),
        ("c@client.example", "4.7.1", "delayed"),
    ]


def test_diagnostic_is_cut_to_300_characters() -> None:
    groups = (
        "Final-Recipient: rfc822; a@client.example\nAction: failed\nStatus: 5.7.1\n"
        "Diagnostic-Code: smtp; 550 5.7.1 Message\n"
        f"    blocked by policy: {'blocked ' * 60}\n\n"
    )
    bounce = read_bounce(parse_mail(_report(groups)))
    assert bounce is not None
    diagnostic = bounce.recipients[0].diagnostic
    assert len(diagnostic) == 300
    assert diagnostic.startswith("550 5.7.1 Message blocked by policy: blocked blocked")


def test_report_of_another_type_is_no_bounce() -> None:
    # An abuse report (ARF) is a multipart/report too.
    groups = "Feedback-Type: abuse\nUser-Agent: SomeGenerator/1.0\nVersion: 1\n\n"
    raw = _report(groups, "feedback-report")
    assert read_bounce(parse_mail(raw)) is None


@pytest.mark.parametrize(
    ("address", "desk", "token"),
    [
        ("support+bounce-3f9a1c2e7b4d8a60@desk.example", "support@desk.example",
         "3f9a1c2e7b4d8a60"),
        ("<support+bounce-3f9a1c2e7b4d8a60@desk.example>", "support@desk.example",
         "3f9a1c2e7b4d8a60"),
        # Some MTAs change the case of what they copy; the domain's case never matters.
        ("Support+Bounce-3f9a1c2e7b4d8a60@DESK.Example", "support@desk.example",
         "3f9a1c2e7b4d8a60"),
        ("help+eu+bounce-ab12@desk.example", "help+eu@desk.example", "ab12"),
        ("support@desk.example", "support@desk.example", None),
        # A signed reply address is no return path.
        ("support+t12-k1-9f2c4d7a1b3e@desk.example", "support@desk.example", None),
        ("support+bounce-@desk.example", "support@desk.example", None),
        ("support+bounce-3f9a1c2e7b4d8a60@other.example", "support@desk.example", None),
        ("sales+bounce-3f9a1c2e7b4d8a60@desk.example", "support@desk.example", None),
        ("xsupport+bounce-3f9a1c2e7b4d8a60@desk.example", "support@desk.example", None),
        ("support+bounce-3f9a/../x@desk.example", "support@desk.example", None),
        ("", "support@desk.example", None),
        ("<>", "support@desk.example", None),
    ],
)
def test_verp_token(address: str, desk: str, token: str | None) -> None:
    assert verp_token(address, desk) == token
