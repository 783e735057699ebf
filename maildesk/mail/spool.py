"""Large attachments decoded straight into files, so that a parse never holds them in memory.

The email package keeps a part's body as text, as a list of its lines while it reads them, and
then decoded: four copies of a 20 MB attachment at once, over 200 MiB. So before it sees a mail,
`spool_large_parts` takes the body of each large base64 part out of the bytes, decodes it in
pieces into a file of the spool directory, and leaves in its place an empty body and a field
naming the file by a token drawn for this parse (a sender cannot forge one). `parse` then makes
that part an attachment whose content is the file. Whoever files the mail moves the file into the
store; `discard_spooled` removes what nobody took.

Only bodies the email package would decode the same way are spooled: base64 made of its alphabet
and line breaks, with padding at its end only. Any other large part is parsed as before.
"""

from __future__ import annotations

import binascii
import contextlib
import hashlib
import os
import re
import secrets
import tempfile
from collections.abc import Iterable
from pathlib import Path

from maildesk.mail.limits import LeafSpan
from maildesk.mail.message import ParsedMail, SpooledFile

SPOOL_FIELD = "X-Maildesk-Spooled"
_PIECE = 1024 * 1024  # Bytes of base64 decoded at a time.
_CLEAN_BASE64 = re.compile(rb"[A-Za-z0-9+/\r\n]*(?:=[\r\n]*){0,2}")
_TRANSFER_ENCODING = re.compile(
    rb"^content-transfer-encoding:([^\n]*(?:\n[ \t][^\n]*)*)", re.I | re.M
)
_NOT_SPOOLED = ("text/", "message/", "multipart/")


def _base64_section(section: bytes) -> bool:
    """Whether a part's header section says its body is base64 (the first such field counts)."""
    found = _TRANSFER_ENCODING.search(section)
    # Compared as the email package compares it: leading blanks dropped, trailing ones kept (it
    # leaves "base64 " encoded, and so must we).
    return found is not None and found.group(1).rstrip(b"\r").lstrip(b" \t").lower() == b"base64"


def _spoolable(raw: bytes, leaf: LeafSpan, threshold: int) -> bool:
    """Whether a leaf is large, an attachment's type, base64 and decodable piece by piece."""
    if leaf.end - leaf.body < threshold or leaf.content_type.startswith(_NOT_SPOOLED):
        return False
    if not _base64_section(raw[leaf.start : leaf.body]):
        return False
    if not _CLEAN_BASE64.fullmatch(memoryview(raw)[leaf.body : leaf.end]):
        return False
    # One character over a multiple of four cannot be decoded: the email package then keeps the
    # encoded text as the content, and so must we, by leaving the part to it.
    breaks = sum(raw.count(c, leaf.body, leaf.end) for c in (b"\r", b"\n", b"="))
    return (leaf.end - leaf.body - breaks) % 4 != 1


def _decode_to_file(body: memoryview, spool_dir: Path) -> SpooledFile:
    """Decode clean base64 into a new file of the spool directory, a piece at a time."""
    fd, path = tempfile.mkstemp(dir=spool_dir, prefix="part-")
    digest, size, carry = hashlib.sha256(), 0, b""
    try:
        with os.fdopen(fd, "wb") as out:
            for start in range(0, len(body), _PIECE):
                text = carry + bytes(body[start : start + _PIECE]).translate(None, b"\r\n=")
                whole = len(text) // 4 * 4
                data, carry = binascii.a2b_base64(text[:whole]), text[whole:]
                out.write(data)
                digest.update(data)
                size += len(data)
            if carry:
                # Padding left out, or dropped above, is put back, as the email package does.
                data = binascii.a2b_base64(carry + b"=" * (4 - len(carry)))
                out.write(data)
                digest.update(data)
                size += len(data)
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
    return SpooledFile(path=path, size=size, sha256=digest.hexdigest())


def spool_large_parts(
    raw: bytes, leaves: list[LeafSpan], spool_dir: Path, threshold: int
) -> tuple[bytes, dict[str, SpooledFile]]:
    """Take large base64 bodies out of a mail into files: the rest of it, and token to file."""
    pieces: list[bytes] = []
    spooled: dict[str, SpooledFile] = {}
    done = 0
    try:
        for leaf in leaves:
            if not _spoolable(raw, leaf, threshold):
                continue
            token = secrets.token_hex(16)
            spooled[token] = _decode_to_file(memoryview(raw)[leaf.body : leaf.end], spool_dir)
            section = raw[leaf.start : leaf.body]
            newline = b"\r\n" if section.endswith(b"\r\n") else b"\n"
            field = f"{SPOOL_FIELD}: {token}".encode() + newline
            pieces += [raw[done : leaf.start], field, section]
            done = leaf.end
    except BaseException:
        discard(spooled.values())
        raise
    if not spooled:
        return raw, {}
    pieces.append(raw[done:])
    return b"".join(pieces), spooled


def discard(files: Iterable[SpooledFile]) -> None:
    """Remove spool files, those already moved away included."""
    for spooled in files:
        with contextlib.suppress(OSError):
            os.unlink(spooled.path)


def discard_spooled(mail: ParsedMail | object) -> None:
    """Remove the spool files of a parsed mail that were not moved into the store."""
    if isinstance(mail, ParsedMail):
        discard(a.spooled for a in mail.attachments if a.spooled is not None)
