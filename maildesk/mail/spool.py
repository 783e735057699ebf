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
from collections.abc import Iterable, Sequence
from pathlib import Path

from maildesk.mail.limits import LeafSpan
from maildesk.mail.message import ParsedMail, SpooledFile
from maildesk.mail.sparse import Hole, SparseMail

SPOOL_FIELD = "X-Maildesk-Spooled"
_PIECE = 256 * 1024  # Bytes of base64 decoded at a time.
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


def _spoolable(raw: bytes, leaf: LeafSpan, threshold: int, holes: Sequence[Hole]) -> bool:
    """Whether a leaf is large, an attachment's type, base64 and decodable piece by piece."""
    left_out = sum(hole.length for hole in holes)
    if leaf.end - leaf.body + left_out < threshold or leaf.content_type.startswith(_NOT_SPOOLED):
        return False
    if not _base64_section(raw[leaf.start : leaf.body]):
        return False
    # The holes are base64's alphabet and line breaks only: what is kept decides.
    if not _CLEAN_BASE64.fullmatch(memoryview(raw)[leaf.body : leaf.end]):
        return False
    # One character over a multiple of four cannot be decoded: the email package then keeps the
    # encoded text as the content, and so must we, by leaving the part to it.
    breaks = sum(raw.count(c, leaf.body, leaf.end) for c in (b"\r", b"\n", b"="))
    breaks += sum(hole.breaks for hole in holes)
    return (leaf.end - leaf.body + left_out - breaks) % 4 != 1


def _decode_to_file(body: Iterable[bytes | memoryview], spool_dir: Path) -> SpooledFile:
    """Decode clean base64, given in pieces, into a new file of the spool directory."""
    fd, path = tempfile.mkstemp(dir=spool_dir, prefix="part-")
    digest, size, carry = hashlib.sha256(), 0, b""

    def _write(data: bytes) -> None:
        nonlocal size
        out.write(data)
        digest.update(data)
        size += len(data)

    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in body:
                for start in range(0, len(chunk), _PIECE):
                    piece = bytes(chunk[start : start + _PIECE])
                    text = memoryview(piece.translate(None, b"\r\n="))
                    if carry:
                        # The group of four that the last piece began is finished on its own,
                        # rather than by joining this whole piece to it.
                        need = 4 - len(carry)
                        if len(text) < need:
                            carry += bytes(text)
                            continue
                        _write(binascii.a2b_base64(carry + text[:need]))
                        text = text[need:]
                    whole = len(text) // 4 * 4
                    _write(binascii.a2b_base64(text[:whole]))
                    carry = bytes(text[whole:])
            if carry:
                # Padding left out, or dropped above, is put back, as the email package does.
                _write(binascii.a2b_base64(carry + b"=" * (4 - len(carry))))
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
    return SpooledFile(path=path, size=size, sha256=digest.hexdigest())


class HoleOutside(Exception):
    """A sparse mail's left-out lines belong to a part that is not spooled: read it whole."""


def spool_large_parts(
    raw: bytes, leaves: list[LeafSpan], spool_dir: Path, threshold: int,
    sparse: SparseMail | None = None,
) -> tuple[bytes, dict[str, SpooledFile]]:
    """Take large base64 bodies out of a mail into files: the rest of it, and token to file.

    With `sparse`, `raw` is its kept bytes, and each of its holes must fall in a spooled part:
    `HoleOutside` is raised otherwise, and nothing is left in the spool.
    """
    pieces: list[bytes] = []
    spooled: dict[str, SpooledFile] = {}
    done = 0
    holes = sparse.holes if sparse is not None else ()
    filled = 0
    try:
        for leaf in leaves:
            inside = [hole for hole in holes if leaf.body < hole.at < leaf.end]
            if not _spoolable(raw, leaf, threshold, inside):
                continue
            token = secrets.token_hex(16)
            if inside:
                assert sparse is not None
                body: Iterable[bytes | memoryview] = sparse.pieces(leaf.body, leaf.end)
            else:
                body = [memoryview(raw)[leaf.body : leaf.end]]
            spooled[token] = _decode_to_file(body, spool_dir)
            filled += len(inside)
            section = raw[leaf.start : leaf.body]
            newline = b"\r\n" if section.endswith(b"\r\n") else b"\n"
            field = f"{SPOOL_FIELD}: {token}".encode() + newline
            pieces += [raw[done : leaf.start], field, section]
            done = leaf.end
        if filled < len(holes):
            raise HoleOutside("a run of base64 lines outside a spooled part")
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
