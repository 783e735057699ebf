"""Large attachments decoded into spool files: the same mail as a parse in memory, files cleaned."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import random
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest

from maildesk.mail.limits import ParseLimits
from maildesk.mail.message import ParsedMail
from maildesk.mail.parse import parse_mail
from maildesk.mail.spool import SPOOL_FIELD

THRESHOLD = 64 * 1024


def mail_with(*attachments: tuple[bytes, str, str]) -> bytes:
    """A customer's text and attachments (content, type, filename), as a mail client sends it."""
    mail = EmailMessage(policy=SMTP)
    mail["From"] = "Claire Dupont <claire.dupont@client.example>"
    mail["To"] = "support@desk.example"
    mail["Subject"] = "Export complet"
    mail["Message-ID"] = "<export@client.example>"
    mail.set_content("Bonjour,\n\nVoici l'export.\n\nClaire\n")
    for data, content_type, filename in attachments:
        maintype, subtype = content_type.split("/")
        mail.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return mail.as_bytes()


def spooling(spool: Path) -> ParseLimits:
    return ParseLimits(spool_dir=str(spool), spool_part_bytes=THRESHOLD)


def assert_same_attachments(spooled: ParsedMail, in_memory: ParsedMail) -> None:
    """Every field of the two parses agrees, each attachment's content read from its file."""
    for field in dataclasses.fields(ParsedMail):
        if field.name not in ("message", "attachments"):
            assert getattr(spooled, field.name) == getattr(in_memory, field.name), field.name
    assert len(spooled.attachments) == len(in_memory.attachments)
    for got, expected in zip(spooled.attachments, in_memory.attachments, strict=True):
        assert (got.filename, got.content_type, got.inline, got.content_id) == (
            expected.filename, expected.content_type, expected.inline, expected.content_id,
        )  # fmt: skip
        assert got.read() == expected.data
        assert got.size == len(expected.data)


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    (tmp_path / "spool").mkdir()
    return tmp_path / "spool"


@pytest.mark.parametrize("size", [300_000, 300_001, 300_002])
def test_a_large_attachment_is_decoded_into_a_file_and_parses_as_in_memory(
    spool: Path, size: int
) -> None:
    pdf = b"%PDF-1.7\n" + random.Random(size).randbytes(size)  # Each length mod 3: its padding.
    raw = mail_with((pdf, "application/pdf", "factures.pdf"))
    spooled = parse_mail(raw, spooling(spool))
    [attachment] = spooled.attachments
    assert attachment.spooled is not None and attachment.data == b""
    assert Path(attachment.spooled.path).parent == spool
    assert attachment.spooled.sha256 == hashlib.sha256(pdf).hexdigest()
    assert_same_attachments(spooled, parse_mail(raw))
    # The email package held an empty body in place of the spooled one.
    assert spooled.message.as_bytes().count(b"\n") < 40


def test_lf_line_ends_and_several_parts_are_spooled_alike(spool: Path) -> None:
    first, second = random.randbytes(200_000), random.randbytes(100_000)
    raw = mail_with(
        (first, "application/pdf", "a.pdf"), (b"small", "application/pdf", "b.pdf"),
        (second, "image/png", "c.png"),
    ).replace(b"\r\n", b"\n")  # fmt: skip
    spooled = parse_mail(raw, spooling(spool))
    assert [a.spooled is not None for a in spooled.attachments] == [True, False, True]
    assert_same_attachments(spooled, parse_mail(raw))
    assert len(list(spool.iterdir())) == 2


def test_small_parts_text_parts_and_unclean_base64_stay_in_memory(spool: Path) -> None:
    big = random.randbytes(200_000)
    text = ("ligne de journal\n" * 20_000).encode()
    raw = mail_with(
        (b"tiny", "application/pdf", "tiny.pdf"), (text, "text/plain", "journal.txt"),
        (big, "application/pdf", "dirty.pdf"),
    )  # fmt: skip
    # A stray character in the base64: the email package decodes that its own way.
    line = base64.b64encode(big[:57])
    assert line in raw
    raw = raw.replace(line, b"*" + line[1:])
    spooled = parse_mail(raw, spooling(spool))
    assert [a.spooled for a in spooled.attachments] == [None, None, None]
    assert_same_attachments(spooled, parse_mail(raw))
    assert list(spool.iterdir()) == []


def test_a_forged_spool_field_names_no_file(spool: Path) -> None:
    raw = mail_with((b"real content", "application/pdf", "small.pdf"))
    field = f"{SPOOL_FIELD}: 0123456789abcdef0123456789abcdef\r\n".encode()
    disposition = b"Content-Disposition: attachment"
    forged = raw.replace(disposition, field + disposition)
    assert forged != raw
    [attachment] = parse_mail(forged, spooling(spool)).attachments
    assert (attachment.spooled, attachment.data) == (None, b"real content")


def test_without_a_spool_directory_nothing_is_spooled(spool: Path) -> None:
    raw = mail_with((random.randbytes(200_000), "application/pdf", "a.pdf"))
    [attachment] = parse_mail(raw, ParseLimits(spool_part_bytes=THRESHOLD)).attachments
    assert attachment.spooled is None and attachment.size == 200_000


@pytest.mark.parametrize(
    ("field", "spooled"),
    [(b"base64", True), (b"  BASE64", True), (b"\tBase64", True), (b"base64  ", False),
     (b"base64 (comment)", False), (b'"base64"', False), (b"\r\n base64", False)],
)  # fmt: skip
def test_the_transfer_encoding_is_read_as_the_email_package_reads_it(
    spool: Path, field: bytes, spooled: bool
) -> None:
    """Spooled exactly where the email package decodes base64; elsewhere it keeps the text."""
    data = random.Random(5).randbytes(100_000)
    raw = (
        b"From: a@client.example\r\nTo: support@desk.example\r\nSubject: x\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="BB"\r\n\r\n'
        b"--BB\r\nContent-Type: text/plain\r\n\r\nBonjour\r\n"
        b'--BB\r\nContent-Type: application/pdf; name="a.pdf"\r\n'
        b"Content-Transfer-Encoding:" + field + b"\r\n\r\n"
        + base64.encodebytes(data).replace(b"\n", b"\r\n") + b"--BB--\r\n"
    )
    [attachment] = parse_mail(raw, spooling(spool)).attachments
    [in_memory] = parse_mail(raw).attachments
    assert (attachment.spooled is not None, attachment.read()) == (spooled, in_memory.data)
    assert (in_memory.data == data) == spooled
