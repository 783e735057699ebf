"""Authentication: only the trusted MTA's topmost verdict, read by RFC 8601's grammar, counts."""

from __future__ import annotations

import pytest

from maildesk.mail.parse import parse_mail
from maildesk.rules.authentication import aligned, authenticate_from

TRUSTED = "mx.desk.example"


def mail(*results: str, sender: str = "claire@client.example") -> bytes:
    head = "".join(f"Authentication-Results: {value}\r\n" for value in results)
    return (f"{head}From: Claire <{sender}>\r\nTo: support@desk.example\r\n"
            "Subject: hello\r\n\r\nBonjour\r\n").encode()


@pytest.mark.parametrize(
    ("results", "authenticated", "reason"),
    [
        # The positive controls.
        ((f"{TRUSTED}; dmarc=pass header.from=client.example",), True, "dmarc=pass"),
        ((f"{TRUSTED}; dkim=pass header.d=client.example header.s=s1",), True,
         "dkim=pass aligned (client.example)"),
        ((f"{TRUSTED}; dkim=pass header.d=mail.client.example",), True,
         "dkim=pass aligned (mail.client.example)"),
        (("MX.Desk.Example 1; DMARC=Pass (policy; p=reject) header.from=Client.Example",), True,
         "dmarc=pass"),
        ((f'{TRUSTED}; dkim=pass header.i="@client.example"',), True,
         "dkim=pass aligned (client.example)"),
        # SPF alone never authenticates a From, anchored or not.
        ((f"{TRUSTED}; spf=pass smtp.mailfrom=x@client.example",), False,
         "sender not authenticated (no DMARC pass or aligned DKIM pass)"),
        ((f"{TRUSTED}; spf=pass smtp.mailfrom=x@client.example.attacker.net",), False,
         "sender not authenticated (no DMARC pass or aligned DKIM pass)"),
        # DMARC for another domain, or failing with the text "dmarc=pass" in a comment.
        ((f"{TRUSTED}; dmarc=pass header.from=other.example",), False,
         "sender not authenticated (no DMARC pass or aligned DKIM pass)"),
        ((f"{TRUSTED}; dmarc=fail (dmarc=pass) header.from=client.example",), False,
         "dmarc=fail"),
        ((f"{TRUSTED}; dmarc=fail header.from=client.example; dkim=pass "
          "header.d=client.example",), False, "dmarc=fail"),
        # Look-alike and suffix DKIM domains.
        ((f"{TRUSTED}; dkim=pass header.d=client.example.attacker.net",), False,
         "sender not authenticated (no DMARC pass or aligned DKIM pass)"),
        ((f"{TRUSTED}; dkim=pass header.d=lient.example",), False,
         "sender not authenticated (no DMARC pass or aligned DKIM pass)"),
        ((f"{TRUSTED}; dkim=pass header.d=example",), False,
         "sender not authenticated (no DMARC pass or aligned DKIM pass)"),
        # Another server's verdict, none at all, or a forged one below the trusted topmost one.
        (("mx.evil.example; dmarc=pass header.from=client.example",), False,
         f"no Authentication-Results from {TRUSTED}"),
        ((), False, f"no Authentication-Results from {TRUSTED}"),
        ((f"{TRUSTED}; dmarc=fail header.from=client.example",
          f"{TRUSTED}; dmarc=pass header.from=client.example"), False, "dmarc=fail"),
        ((f"{TRUSTED}; none", f"{TRUSTED}; dmarc=pass header.from=client.example"), False,
         "sender not authenticated (no DMARC pass or aligned DKIM pass)"),
        # The whole header as an encoded word, and a header that does not parse.
        ((f"=?UTF-8?Q?{TRUSTED};_dmarc=pass_header.from=client.example?=",), False,
         f"no Authentication-Results from {TRUSTED}"),
        ((f"{TRUSTED}; dmarc=pass header.from==?UTF-8?Q?client.example?=",), False,
         f"unreadable Authentication-Results from {TRUSTED}"),
        ((f'{TRUSTED}; dmarc="pass" header.from=client.example',), False,
         f"unreadable Authentication-Results from {TRUSTED}"),
    ],
)
def test_the_trusted_verdict(results: tuple[str, ...], authenticated: bool, reason: str) -> None:
    verdict = authenticate_from(parse_mail(mail(*results)), TRUSTED)
    assert verdict is not None
    assert (verdict.authenticated, verdict.reason) == (authenticated, reason)


def test_without_a_trusted_authserv_id_there_is_no_verdict() -> None:
    passed = parse_mail(mail(f"{TRUSTED}; dmarc=pass header.from=client.example"))
    assert authenticate_from(passed, None) is None
    assert authenticate_from(passed, "") is None


@pytest.mark.parametrize(
    ("signer", "sender", "expected"),
    [
        ("client.example", "client.example", True),
        ("mail.client.co.uk", "client.co.uk", True),
        ("other.co.uk", "client.co.uk", False),
        ("co.uk", "client.co.uk", False),
        ("client.example.evil.example", "client.example", False),
        ("evil-client.example", "client.example", False),
    ],
)
def test_alignment_by_the_public_suffix_list(signer: str, sender: str, expected: bool) -> None:
    assert aligned(signer, sender) is expected
