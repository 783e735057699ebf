"""A large mail read with its long base64 runs left in its file: the same parse, less memory."""

from __future__ import annotations

import random
import tracemalloc
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest

from maildesk.mail import sparse
from maildesk.mail.limits import ParseLimits
from maildesk.mail.message import MalformedMail
from maildesk.mail.parse import parse_mail, parse_mail_file
from maildesk.mail.sparse import SparseMail, read_sparse
from tests.mail.test_spool import assert_same_attachments, mail_with

THRESHOLD = 64 * 1024


def spooling(spool: Path, **bounds: int) -> ParseLimits:
    return ParseLimits(spool_dir=str(spool), spool_part_bytes=THRESHOLD, **bounds)


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    (tmp_path / "spool").mkdir()
    return tmp_path / "spool"


def stored(tmp_path: Path, raw: bytes, name: str = "mail.eml") -> Path:
    path = tmp_path / name
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize("block", [997, 4096, 1024 * 1024])
@pytest.mark.parametrize("line_end", [b"\r\n", b"\n"])
def test_the_holes_filled_from_the_file_give_back_the_mail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int, line_end: bytes
) -> None:
    # Blocks of odd sizes cut lines and runs anywhere, as a 1 MiB block does in a 20 MB mail.
    monkeypatch.setattr(sparse, "_BLOCK", block)
    raw = mail_with(
        (random.Random(1).randbytes(300_000), "application/pdf", "a.pdf"),
        (b"small", "application/pdf", "b.pdf"),
        (random.Random(2).randbytes(150_000), "application/zip", "c.zip"),
    ).replace(b"\r\n", line_end)
    read = read_sparse(stored(tmp_path, raw), THRESHOLD)
    assert isinstance(read, SparseMail)
    assert len(read.holes) == 2 and read.size == len(raw)
    assert len(read.kept) < 10_000
    assert b"".join(read.pieces(0, len(read.kept))) == raw
    assert read.kept.count(b"\n") + read.hidden_lines() == raw.count(b"\n")


def test_a_mail_without_long_runs_is_read_whole(tmp_path: Path) -> None:
    raw = mail_with((random.Random(3).randbytes(30_000), "application/pdf", "a.pdf"))
    assert read_sparse(stored(tmp_path, raw), THRESHOLD) == raw


@pytest.mark.parametrize("size", [300_000, 300_001, 300_002])
def test_a_sparse_mail_parses_as_the_whole_mail(tmp_path: Path, spool: Path, size: int) -> None:
    pdf = b"%PDF-1.7\n" + random.Random(size).randbytes(size)
    raw = mail_with((pdf, "application/pdf", "factures.pdf"), (b"x" * 10, "text/csv", "t.csv"))
    parsed = parse_mail_file(stored(tmp_path, raw), spooling(spool))
    [large, _small] = parsed.attachments
    assert large.spooled is not None
    assert_same_attachments(parsed, parse_mail(raw))


def test_a_long_run_in_a_part_that_is_not_spooled_is_read_from_the_file(
    tmp_path: Path, spool: Path
) -> None:
    # A text body of base64-looking lines: the holes would fall in the text, so it is read whole.
    lines = b"".join(b"QUJD%06d\r\n" % n for n in range(20_000))
    mail = EmailMessage(policy=SMTP)
    mail["From"] = "claire.dupont@client.example"
    mail["Subject"] = "Journal"
    mail.set_content(lines, maintype="text", subtype="plain", cte="7bit")
    mail.add_attachment(random.Random(4).randbytes(200_000), maintype="application",
                        subtype="pdf", filename="a.pdf")  # fmt: skip
    raw = mail.as_bytes()
    path = stored(tmp_path, raw)
    assert isinstance(read_sparse(path, THRESHOLD), SparseMail)
    parsed = parse_mail_file(path, spooling(spool))
    assert parsed.text == parse_mail(raw).text and parsed.text.count("\n") == 19_999
    assert_same_attachments(parsed, parse_mail(raw))
    # Only the PDF's file is in the spool: none was left by the sparse attempt.
    spooled = parsed.attachments[0].spooled
    assert spooled is not None and list(spool.iterdir()) == [Path(spooled.path)]


def test_bounds_count_what_the_holes_left_out(tmp_path: Path, spool: Path) -> None:
    raw = mail_with((random.Random(5).randbytes(300_000), "application/pdf", "a.pdf"))
    path = stored(tmp_path, raw)
    lines, size = raw.count(b"\n"), len(raw)
    for bounds, reason in (({"max_lines": lines - 1}, "too many lines"),
                           ({"max_mail_bytes": size - 1}, "too large")):  # fmt: skip
        with pytest.raises(MalformedMail, match=reason):
            parse_mail(raw, spooling(spool, **bounds))
        with pytest.raises(MalformedMail, match=reason):
            parse_mail_file(path, spooling(spool, **bounds))
    assert parse_mail_file(path, spooling(spool, max_lines=lines)).attachments[0].size == 300_000
    assert list(spool.iterdir()) != []


def test_bare_carriage_returns_make_the_mail_read_whole(tmp_path: Path, spool: Path) -> None:
    raw = mail_with((random.Random(6).randbytes(300_000), "application/pdf", "a.pdf"))
    raw = raw.replace(b"Voici l'export.", b"Voici\rl'export.")
    parsed = parse_mail_file(stored(tmp_path, raw), spooling(spool))
    assert_same_attachments(parsed, parse_mail(raw))


def test_a_file_cut_short_after_it_was_read_is_a_disk_fault(tmp_path: Path, spool: Path) -> None:
    raw = mail_with((random.Random(7).randbytes(300_000), "application/pdf", "a.pdf"))
    path = stored(tmp_path, raw)
    read = read_sparse(path, THRESHOLD)
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(OSError, match="shorter"):
        parse_mail(read, spooling(spool))
    assert list(spool.iterdir()) == []


def test_a_large_attachment_is_never_held_whole(tmp_path: Path, spool: Path) -> None:
    pdf = random.Random(8).randbytes(8_000_000)
    path = stored(tmp_path, mail_with((pdf, "application/pdf", "a.pdf")))
    tracemalloc.start()
    try:
        parsed = parse_mail_file(path, ParseLimits(spool_dir=str(spool)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parsed.attachments[0].size == len(pdf)
    # The mail is 10.8 MB of base64; read whole, the peak was over that.
    assert peak < 4 * 1024 * 1024, peak
