"""A large mail read without its long runs of base64 lines, which stay in its file.

The parse child used to read a large mail whole before `scan_shape` and the spool saw it: 26 MiB
held for a 20 MB attachment. But a line made only of base64's alphabet can be no delimiter (they
start with "--"), no header field (no colon) and no continuation line (no leading blank), so a
long run of such lines is the inside of some part's body whatever the mail's structure. The
reader keeps the first and the last line of each run of `threshold` bytes or more and leaves a
`Hole` between them that says where the rest sits in the file; the scan sees the same lines
around it, and the spool decodes a part's body from the kept bytes and the file's, in pieces.

A hole is read back only inside a spooled part: a mail whose holes fall anywhere else is read
whole and parsed as before (see `parse.parse_mail`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

_BLOCK = 256 * 1024  # Bytes read from the file at a time.
# A stretch of base64's alphabet and line breaks, padding excluded ("=" may only end a body, and
# the spool's check for clean base64 must see where it stands). A single class repeated: the
# regex engine matches it in a loop, where a repeated group of lines would keep a stack growing
# with each line (2.7 MB of it for a 1 MiB block).
_STRETCH = re.compile(rb"[A-Za-z0-9+/\r\n]+")


class Hole(NamedTuple):
    """Lines left in the file: where they belong in the kept bytes, and where they are."""

    at: int  # The offset in the kept bytes where the left-out lines would start.
    offset: int  # Their offset in the file.
    length: int  # Their length in bytes.
    lines: int  # How many lines they are.
    breaks: int  # How many of their bytes are CR or LF.


class SparseMail(NamedTuple):
    """A mail's bytes with its long base64 runs left out, and where to read them."""

    kept: bytes
    path: str
    size: int  # The size of the whole mail.
    holes: tuple[Hole, ...]

    def hidden_lines(self) -> int:
        """How many lines the holes leave out."""
        return sum(hole.lines for hole in self.holes)

    def pieces(self, start: int, end: int) -> Iterator[bytes]:
        """The mail's bytes between two offsets of the kept bytes, holes filled from the file."""
        with open(self.path, "rb") as stored:
            for hole in self.holes:
                if not start < hole.at < end:
                    continue
                yield self.kept[start : hole.at]
                stored.seek(hole.offset)
                for done in range(0, hole.length, _BLOCK):
                    wanted = min(_BLOCK, hole.length - done)
                    piece = stored.read(wanted)
                    if len(piece) < wanted:
                        raise OSError(f"{self.path} is shorter than when it was read")
                    yield piece
                start = hole.at
            yield self.kept[start:end]


class _Run:
    """A run of base64 lines being read: whole while short, only its ends once long."""

    def __init__(self, offset: int, threshold: int) -> None:
        self.offset = offset  # Where the run starts in the file.
        self.threshold = threshold
        self.held: list[bytes] | None = []  # The run's bytes, until it is long.
        self.first = b""
        self.last = b""
        self.length = self.lines = self.breaks = 0

    def extend(self, text: bytes, start: int, end: int) -> None:
        """Add the whole lines text[start:end] to the run."""
        if not self.length:
            self.first = text[start : text.find(b"\n", start, end) + 1]
        self.length += end - start
        lines = text.count(b"\n", start, end)
        self.lines += lines
        self.breaks += lines + text.count(b"\r", start, end)
        self.last = text[text.rfind(b"\n", start, end - 1) + 1 or start : end]
        if self.held is not None:
            if self.length >= self.threshold and self.lines >= 3:
                self.held = None  # Long: from now on only its ends are kept.
            else:
                self.held.append(text[start:end])

    def close(self, kept: list[bytes], kept_bytes: int) -> tuple[int, Hole | None]:
        """Append what the run keeps; the bytes appended and the hole left, if any."""
        if self.held is not None:
            whole = b"".join(self.held)
            kept.append(whole)
            return len(whole), None
        first, last = self.first, self.last
        kept += [first, last]
        middle = self.length - len(first) - len(last)
        breaks = self.breaks - _breaks(first) - _breaks(last)
        hole = Hole(kept_bytes + len(first), self.offset + len(first), middle, self.lines - 2,
                    breaks)  # fmt: skip
        return len(first) + len(last), hole


def _breaks(line: bytes) -> int:
    return line.count(b"\n") + line.count(b"\r")


def _runs(text: bytes, cut: int) -> Iterator[tuple[int, int]]:
    """The spans of whole lines of base64's alphabet in text[:cut], which starts a line."""
    for found in _STRETCH.finditer(text, 0, cut):
        start, end = found.span()
        if start and text[start - 1] != 10:  # Begun mid-line: the run starts at the next line.
            start = text.find(b"\n", start, end) + 1
            if not start:
                continue
        # A run starts with a line of the alphabet: a blank line before it may be the one that
        # ends a header section, which the scan must see where it is.
        while start < end and text[start] in b"\r\n":
            start = text.find(b"\n", start, end) + 1 or end
        end = text.rfind(b"\n", start, end) + 1  # Ended mid-line: the run ends with the last.
        # Nor does it end with a blank line: the line break before a delimiter belongs to it.
        while end > start:
            last = text.rfind(b"\n", start, end - 1) + 1 or start
            if end - last > 2 or text[last] not in b"\r\n":
                break
            end = last
        # A bare CR ends a line for the feed parser, and scan_shape makes it CRLF first: a
        # stretch with one is left in the kept bytes, where it is made so.
        if end > start and text.count(b"\r", start, end) == text.count(b"\r\n", start, end):
            yield start, end


def read_sparse(path: str | Path, threshold: int) -> bytes | SparseMail:
    """Read a mail, leaving out runs of base64 lines of `threshold` bytes or more."""
    kept: list[bytes] = []
    kept_bytes = 0
    holes: list[Hole] = []
    run: _Run | None = None
    position = 0  # The file offset of the block being looked at.
    with open(path, "rb") as stored:
        size = _BLOCK
        while True:
            # Each block is read from the start of the line that the last one cut, rather than
            # joined to it, which would copy the block.
            stored.seek(position)
            text = stored.read(size)
            if not text:
                break
            ended = len(text) < size
            cut = len(text) if ended else text.rfind(b"\n") + 1
            if not cut:
                size *= 2  # A line longer than a block: read more of it at once.
                continue
            size = _BLOCK
            done = 0
            for start, end in _runs(text, cut):
                if start > done or run is None:
                    if run is not None:
                        added, hole = run.close(kept, kept_bytes)
                        kept_bytes += added
                        holes += [hole] if hole else []
                    kept.append(text[done:start])
                    kept_bytes += start - done
                    run = _Run(position + start, threshold)
                run.extend(text, start, end)
                done = end
            if done < cut and run is not None:
                added, hole = run.close(kept, kept_bytes)
                kept_bytes += added
                holes += [hole] if hole else []
                run = None
            kept.append(text[done:cut])
            kept_bytes += cut - done
            position += cut
            if ended:
                break
    if run is not None:
        added, hole = run.close(kept, kept_bytes)
        holes += [hole] if hole else []
    whole = b"".join(kept)
    if not holes:
        return whole
    return SparseMail(whole, str(path), position, tuple(holes))
