"""Terminal output that nothing stored can subvert: cleaned text, tables with headings, JSON.

Subjects, names and bodies come from mails and CSV files, so they may carry ESC sequences (which
recolour, retitle or clear the operator's terminal, or worse), other controls, or bidi controls
that make text read differently from what it is. Everything the CLI prints from the store goes
through `terminal_safe`, which writes such characters as visible escapes like `\\x1b` instead.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from collections.abc import Sequence
from typing import Any, TextIO

ELLIPSIS = "…"

# Bidi embeddings, overrides and isolates, and the marks: text that shows in another order.
_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
# C0 controls, DEL, C1 controls, the bidi controls, and lone surrogates (which no terminal
# encoding can write, so printing them would crash the command).
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}\ud800-\udfff]")
# The line breaks a table cell turns into spaces; CRLF counts as one.
_BREAKS = re.compile("\r\n|[\n\r\v\f\x85\u2028\u2029]")
# In multi-line text a CR alone would let a line overwrite the one the operator is reading.
_MULTILINE_BREAKS = re.compile("\r\n?|[\v\f\x85\u2028\u2029]")
# What json.dumps(ensure_ascii=False) leaves raw although a terminal would act on it; JSON
# escapes control characters below U+0020 itself.
_JSON_UNSAFE = re.compile(f"[\x7f-\x9f{_BIDI}\u2028\u2029\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def terminal_safe(value: object, *, multiline: bool = False) -> str:
    """`value` as text a terminal shows as is: controls escaped, one line unless `multiline`."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    if multiline:
        text = _MULTILINE_BREAKS.sub("\n", text)
        # Tabs and newlines are the only controls that multi-line text keeps.
        return "\n".join(
            "\t".join(_UNSAFE.sub(_escape, piece) for piece in line.split("\t"))
            for line in text.split("\n")
        )
    text = _BREAKS.sub(" ", text).replace("\t", " ")
    return _UNSAFE.sub(_escape, text)


def _char_width(char: str) -> int:
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def display_width(text: str) -> int:
    """How many terminal columns `text` takes: wide East Asian characters take two."""
    if text.isascii():
        return len(text)
    return sum(_char_width(char) for char in text)


def cut(text: str, width: int) -> str:
    """`text` cut to at most `width` columns, ending with "…" when something was cut."""
    if display_width(text) <= width:
        return text
    kept, used = [], 0
    for char in text:
        used += _char_width(char)
        if used > width - 1:
            break
        kept.append(char)
    return "".join(kept).rstrip() + ELLIPSIS


def _pad(text: str, width: int) -> str:
    return text + " " * (width - display_width(text))


def table_lines(
    rows: Sequence[Sequence[object]], headings: Sequence[str], *, max_width: int = 60
) -> list[str]:
    """The lines of a table: headings, then one line per row, cells cleaned and cut."""
    names = [cut(terminal_safe(h), max_width) for h in headings]
    cells = [
        [cut(terminal_safe(value), max_width) for value in row] + [""] * (len(names) - len(row))
        for row in rows
    ]
    widths = [
        max([display_width(name), *(display_width(row[i]) for row in cells)])
        for i, name in enumerate(names)
    ]
    lines = ["  ".join(_pad(c, w) for c, w in zip(names, widths, strict=False)).rstrip()]
    for row in cells:
        lines.append("  ".join(_pad(c, w) for c, w in zip(row, widths, strict=False)).rstrip())
    if not rows:
        lines.append("(none)")
    return lines


def table(
    rows: Sequence[Sequence[object]],
    headings: Sequence[str],
    *,
    max_width: int = 60,
    out: TextIO | None = None,
) -> None:
    """Print `rows` under `headings`; every cell is cleaned and cut to `max_width` columns."""
    print("\n".join(table_lines(rows, headings, max_width=max_width)), file=out or sys.stdout)


def json_text(value: Any) -> str:
    """`value` as indented JSON in which no character a terminal acts on appears raw."""
    text = json.dumps(value, ensure_ascii=False, indent=2, default=str)
    # Outside strings JSON holds only ASCII punctuation, so every match is inside a string,
    # where a \\u escape stands for the same character.
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def print_json(value: Any) -> None:
    """Print `value` as JSON, safe for a terminal."""
    print(json_text(value))
