"""Hostile mails: each is refused with the bound it breaks, or parsed, within a bound on CPU work.

Every bomb is generated here (they are big). The CPU bound is generous: it bounds the work the
parser may do on a mail of this shape, it does not time the parser. Before these bounds, the
same mails took from 14 s to over 300 s of CPU each.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable

import pytest

from maildesk.mail.limits import TRUNCATION_MARKER, ParseLimits
from maildesk.mail.message import ParsedMail
from maildesk.mail.parse import MalformedMail, parse_mail

CPU_SECONDS = 5.0
HEAD = (
    b"Return-Path: <mallory@evil.example>\r\n"
    b"Received: from mx.evil.example (mx.evil.example [203.0.113.7])\r\n"
    b"\tby mx.desk.example (Postfix) with ESMTPS id 4Z1kQm3v9Rz2xN\r\n"
    b"\tfor <support@desk.example>; Fri, 27 Nov 2026 10:05:02 +0100 (CET)\r\n"
    b"From: Mallory Martin <mallory@evil.example>\r\n"
    b"To: support@desk.example\r\n"
    b"Subject: Question about invoice FA-2026-0412\r\n"
    b"Date: Fri, 27 Nov 2026 10:05:00 +0100\r\n"
    b"Message-ID: <20261127100500.4f2a@evil.example>\r\n"
    b"MIME-Version: 1.0\r\n"
)


def refusal(raw: bytes, limits: ParseLimits | None = None) -> str:
    """Parse a mail that must be refused; return the reason, checking the work it took."""
    start = time.process_time()
    with pytest.raises(MalformedMail) as caught:
        parse_mail(raw, limits)
    assert time.process_time() - start < CPU_SECONDS
    return caught.value.reason


def parsed(raw: bytes, limits: ParseLimits | None = None) -> ParsedMail:
    """Parse a mail that must be accepted, checking the work it took."""
    start = time.process_time()
    mail = parse_mail(raw, limits)
    assert time.process_time() - start < CPU_SECONDS
    return mail


def multipart(*parts: bytes, boundary: bytes = b"=_part") -> bytes:
    """A multipart/mixed mail of the given parts (each its headers, a blank line, its body)."""
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
    return (
        HEAD + b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n'
        + body + b"--" + boundary + b"--\r\n"
    )


TEXT_PART = b"Content-Type: text/plain; charset=utf-8\r\n\r\nPlease see the attachment."

# The bombs that were reported, and the bound each one now breaks.


@pytest.mark.parametrize("separator", [b"; ", b";\r\n\t"], ids=["one-line", "folded"])
def test_megabyte_content_type_parameter_list(separator: bytes) -> None:
    params = b"".join(separator + b'p%d="v%d"' % (i, i) for i in range(70_000))
    raw = HEAD + b"Content-Type: text/plain" + params + b"\r\n\r\nHello\r\n"
    assert len(raw) > 1_000_000
    assert refusal(raw) == "header section too large (over 262144 bytes)"


def test_megabyte_content_disposition() -> None:
    params = b"".join(b";\r\n filename*%d*=utf-8''%%C3%%A9t%%C3%%A9" % i for i in range(30_000))
    raw = multipart(
        TEXT_PART,
        b"Content-Type: application/pdf\r\nContent-Disposition: attachment"
        + params + b"\r\n\r\n%PDF-1.4",
    )
    assert len(raw) > 1_000_000
    assert refusal(raw) == "header section too large (over 262144 bytes)"


def test_twenty_thousand_attachments_with_bare_cr_line_ends() -> None:
    attachment = (
        b"Content-Type: application/octet-stream; name=\"scan.bin\"\r\n"
        b"Content-Disposition: attachment; filename=\"scan.bin\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQF"
    )
    raw = multipart(TEXT_PART, *[attachment] * 20_000).replace(b"\r\n", b"\r")
    assert b"\n" not in raw
    assert refusal(raw) == "too many MIME parts (over 500)"


def test_two_megabyte_punycode_body_is_read_as_utf8() -> None:
    # Python's punycode decoder is pure Python and quadratic: this body took over 200 s.
    body = b"x" * 999_999 + b"-" + b"a" * 999_999
    raw = HEAD + b"Content-Type: text/plain; charset=punycode\r\n\r\n" + body
    assert parsed(raw).text == body.decode()


@pytest.mark.parametrize(
    ("transfer_encoding", "encode"),
    [
        ("base64", lambda text: base64.b64encode(text)),  # One line of 2 MB.
        ("quoted-printable", lambda text: text.replace(b"\xc3\xa9", b"=C3=A9")),
    ],
)
def test_two_megabyte_body_on_one_line(
    transfer_encoding: str, encode: Callable[[bytes], bytes]
) -> None:
    text = "Réponse à la facture ".encode() * 70_000
    raw = (
        HEAD + b"Content-Type: text/plain; charset=utf-8\r\n"
        + f"Content-Transfer-Encoding: {transfer_encoding}\r\n\r\n".encode() + encode(text)
    )
    assert len(raw) > 1_600_000
    assert parsed(raw).text == text.decode().rstrip()


def test_two_megabyte_html_paragraph_of_ampersands() -> None:
    # nh3 took time quadratic in the ampersands of one text node: 7 s for this mail.
    html = b"<p>" + b"Tom &amp; Jerry " * 124_000
    raw = HEAD + b"Content-Type: text/html; charset=utf-8\r\n\r\n" + html
    mail = parsed(raw)
    assert mail.text == " ".join(["Tom & Jerry"] * 124_000)
    assert mail.html == html.decode() + "</p>"
    assert mail.truncated is False


def test_html_of_too_many_tags_is_flattened_to_text() -> None:
    raw = HEAD + b"Content-Type: text/html; charset=utf-8\r\n\r\n" + b"line<br>" * 250_000
    mail = parsed(raw)
    assert mail.text == " ".join(["line"] * 250_000)
    assert mail.html == " ".join(["line"] * 250_000)


@pytest.mark.parametrize("header", [b"From: mallory@evil.example ", b"Content-Type: text/plain ",
                                    b"X-Mailer: Outlook "])
def test_twelve_hundred_nested_comments(header: bytes) -> None:
    raw = header + b"(" * 1200 + b"\r\nFrom: mallory@evil.example\r\nSubject: hi\r\n\r\nhi\r\n"
    assert len(raw) < 1400
    assert refusal(raw) == "comments nested too deep (over 50 levels)"


def test_fifty_nested_comments_are_allowed() -> None:
    raw = HEAD + b"X-Note: " + b"(" * 50 + b"deep" + b")" * 50 + b"\r\n\r\nhi\r\n"
    assert parsed(raw).text == "hi"


@pytest.mark.parametrize("line_end", [b"\r\n", b"\r"], ids=["crlf", "bare-cr"])
def test_hundred_thousand_parts(line_end: bytes) -> None:
    raw = multipart(*[b"\r\nx"] * 100_000).replace(b"\r\n", line_end)
    assert refusal(raw) == "too many MIME parts (over 500)"


@pytest.mark.parametrize("line_end", [b"\r\n", b"\r"], ids=["crlf", "bare-cr"])
def test_ten_thousand_deep(line_end: bytes) -> None:
    levels = b"".join(
        b'Content-Type: multipart/mixed; boundary="level%d"\r\n\r\n--level%d\r\n' % (i, i)
        for i in range(10_000)
    )
    raw = (HEAD + levels + b"Content-Type: text/plain\r\n\r\nx\r\n").replace(b"\r\n", line_end)
    assert refusal(raw) == "nested too deep (over 20 levels)"


def test_attached_messages_count_as_levels() -> None:
    levels = b"Content-Type: message/rfc822\r\n\r\nFrom: a@client.example\r\n" * 21
    assert refusal(HEAD + levels + b"\r\nx\r\n") == "nested too deep (over 20 levels)"
    assert parsed(HEAD + levels[: -len(levels) // 21] + b"\r\nx\r\n").attachments[0].filename == (
        "message.eml"
    )


# The other bounds.


def test_too_large() -> None:
    raw = HEAD + b"\r\n" + b"x" * (30_000_000 - len(HEAD) - 2)
    assert refusal(raw) == "too large (30000000 bytes, the limit is 26214400)"


def test_millions_of_short_lines() -> None:
    # The feed parser spends a microsecond a line: 9 s for twelve million.
    raw = HEAD + b"Content-Type: text/plain\r\n\r\n" + b"a\n" * 12_000_000
    assert refusal(raw) == "too many lines (over 1000000)"


def test_header_section_of_a_part_is_bounded() -> None:
    raw = multipart(TEXT_PART, b"X-Padding: x\r\n" * 20_000 + b"\r\nbody")
    assert refusal(raw) == "header section too large (over 262144 bytes)"


def test_one_header_field_is_bounded() -> None:
    raw = HEAD + b"Content-Type: text/plain; name=\"" + b"a" * 17_000 + b"\"\r\n\r\nx"
    assert refusal(raw) == "header field too large (over 16384 bytes)"


@pytest.mark.parametrize("header", ["Content-Type", "Content-Disposition"])
def test_parameters_are_counted(header: str) -> None:
    def mail(count: int) -> bytes:
        params = "".join(f';\r\n\tx-param{i}="value {i}"' for i in range(count))
        if header == "Content-Type":
            headers = f"Content-Type: application/pdf{params}"
        else:
            headers = f"Content-Type: application/pdf\r\nContent-Disposition: attachment{params}"
        return multipart(TEXT_PART, f"{headers}\r\n\r\n%PDF".encode())

    assert refusal(mail(65)) == f"too many parameters in {header} (over 64)"
    assert len(parsed(mail(64)).attachments) == 1


def test_delivery_status_of_many_blocks() -> None:
    blocks = b"\r\n".join(b"Final-Recipient: rfc822; u%d@desk.example\r\nAction: failed\r\n" % i
                          for i in range(1000))
    raw = multipart(TEXT_PART, b"Content-Type: message/delivery-status\r\n\r\n" + blocks)
    assert refusal(raw) == "too many MIME parts (over 500)"


def test_delivery_status_cannot_nest() -> None:
    status = b"Content-Type: message/delivery-status\r\n\r\nContent-Type: message/rfc822\r\n\r\n"
    assert refusal(multipart(TEXT_PART, status)) == (
        "Content-Type field inside message/delivery-status"
    )


def test_boundary_in_a_codec_not_meant_for_mail_is_read_as_utf8() -> None:
    # email.utils would decode it as punycode ("café"), in quadratic time on a long one.
    raw = (
        HEAD + b"Content-Type: multipart/mixed; boundary*=punycode''caf-dma\r\n\r\n"
        b"--caf-dma\r\nContent-Type: text/plain\r\n\r\nhi\r\n--caf-dma--\r\n"
    )
    assert parsed(raw).text == "hi"
    long = HEAD + b"Content-Type: multipart/mixed; boundary*=punycode''" + b"a" * 8000 + b"-b"
    assert parsed(long + b"\r\n\r\n--x\r\n\r\nhi\r\n").text == "--x\n\nhi"


def test_closing_delimiter_right_after_a_delimiter_does_not_hide_parts() -> None:
    # The feed parser skips delimiter lines that follow one, closing ones too: the parts after
    # that "--b--" are still parts, and must be counted.
    raw = (
        HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n--b--\r\n\r\nx\r\n'
        + b"--b\r\n\r\nx\r\n" * 600 + b"--b--\r\n"
    )
    assert refusal(raw) == "too many MIME parts (over 500)"
    assert parsed(raw, ParseLimits(max_parts=1000)).text == "\n\n".join(["x"] * 601)


def test_limits_can_be_tightened() -> None:
    raw = multipart(TEXT_PART, TEXT_PART, TEXT_PART)
    assert refusal(raw, ParseLimits(max_parts=3)) == "too many MIME parts (over 3)"
    assert parsed(raw, ParseLimits(max_parts=4)).text == "\n\n".join(
        ["Please see the attachment."] * 3
    )


# The worst that the bounds let through must still be cheap.


def test_worst_mail_within_the_bounds() -> None:
    # policy.default's MIME header parsers take 50 ms or more on each of these hostile
    # headers, and each part's are read a dozen times: they are read as compat32 reads them.
    params = "".join(f';\r\n p{i}="{" a" * 110}"' for i in range(63))
    attachment = (
        f"Content-Type: application/octet-stream{params}\r\n"
        f"Content-Disposition: attachment; filename=\"f.bin\"{params}\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\nAAECAwQF"
    ).encode()
    mail = parsed(multipart(TEXT_PART, *[attachment] * 498))
    assert [(a.filename, a.data) for a in mail.attachments] == [("f.bin", bytes(range(6)))] * 498


def test_from_of_dots() -> None:
    # policy.default's address parser took 74 s on 64 KiB of these, and 0.5 s on 8 KiB.
    raw = HEAD.replace(b"From: Mallory Martin <mallory@evil.example>", b"From: a" + b"." * 15_000
                       + b"@evil.example")
    assert refusal(raw) == "From header has no usable address"


def test_subject_of_unclosed_encoded_words() -> None:
    subject = "=?utf-8?q?" * 1600
    raw = HEAD.replace(b"Question about invoice FA-2026-0412", subject.encode())
    assert parsed(raw + b"\r\nhi").subject == subject


def test_long_text_is_cut_with_a_marker() -> None:
    line = "Ligne de journal numéro 42 : délai dépassé\r\n".encode()
    raw = HEAD + b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + line * 60_000
    mail = parsed(raw)
    kept = ("Ligne de journal numéro 42 : délai dépassé\n" * 60_000)[:2_000_000].rstrip()
    assert mail.text == kept + "\n\n" + TRUNCATION_MARKER.format(limit=2_000_000)
    assert mail.truncated is True
