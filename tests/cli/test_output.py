"""Terminal output: controls from mails and CSV files never reach the terminal raw."""

from __future__ import annotations

import io
import json

import pytest

from maildesk.cli.output import cut, display_width, json_text, table, table_lines, terminal_safe

# Every character terminal_safe must write as an escape, in one line and in many alike.
ESCAPED = [
    *(chr(c) for c in range(0x20) if chr(c) not in "\t\n\v\f\r"),
    "\x7f",
    *(chr(c) for c in range(0x80, 0xA0) if c != 0x85),
    "\u061c", "\u200e", "\u200f", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e",
    "\u2066", "\u2067", "\u2068", "\u2069",
    "\udc9b",  # A lone surrogate, as undecodable bytes become: no terminal encoding takes it.
]


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


@pytest.mark.parametrize("char", ESCAPED, ids=lambda c: f"U+{ord(c):04X}")
def test_every_control_is_escaped(char: str) -> None:
    assert terminal_safe(f"a{char}b") == f"a{_escape(char)}b"
    assert terminal_safe(f"a{char}b", multiline=True) == f"a{_escape(char)}b"


def test_an_esc_sequence_becomes_visible_text() -> None:
    title = "Facture\x1b]0;root@desk:~\x07 \x1b[2J\x1b[31mimpayée\u202etxt.exe"
    assert terminal_safe(title) == (
        "Facture\\x1b]0;root@desk:~\\x07 \\x1b[2J\\x1b[31mimpayée\\u202etxt.exe"
    )


@pytest.mark.parametrize(
    ("text", "cell"),
    [
        ("ligne 1\nligne 2", "ligne 1 ligne 2"),
        ("ligne 1\r\nligne 2", "ligne 1 ligne 2"),
        ("ligne 1\rligne 2", "ligne 1 ligne 2"),
        ("a\tb\vc\fd\x85e\u2028f\u2029g", "a b c d e f g"),
    ],
)
def test_a_cell_is_one_line(text: str, cell: str) -> None:
    assert terminal_safe(text) == cell


def test_multiline_text_keeps_its_lines_and_tabs_and_loses_carriage_returns() -> None:
    text = "Bonjour,\r\n\r\nPrix :\t12 €\x1b[8m\nmot de passe\rMerci\x00"
    assert terminal_safe(text, multiline=True) == (
        "Bonjour,\n\nPrix :\t12 €\\x1b[8m\nmot de passe\nMerci\\x00"
    )


def test_printable_unicode_is_kept() -> None:
    text = "Zoé Lefèvre — 東京オフィス 🙂 Ελληνικά עברית"
    assert terminal_safe(text) == text


def test_values_of_other_types_are_text() -> None:
    assert (terminal_safe(None), terminal_safe(42), terminal_safe(True)) == ("", "42", "True")


def test_width_counts_wide_and_combining_characters() -> None:
    assert display_width("東京") == 4
    assert display_width("e\u0301te\u0301") == 3
    assert cut("東京オフィス", 7) == "東京オ…"
    assert cut("short", 5) == "short"
    assert cut("a little longer", 8) == "a littl…"


def test_a_table_has_headings_and_columns_as_wide_as_their_content() -> None:
    lines = table_lines(
        [[1, "Zoé Lefèvre", "ACME\x1b[2J SA"], [12, "東京", None]],
        ["ID", "NAME", "COMPANY"],
    )
    assert lines == [
        "ID  NAME         COMPANY",
        "1   Zoé Lefèvre  ACME\\x1b[2J SA",
        "12  東京",
    ]


def test_long_cells_are_cut() -> None:
    lines = table_lines([["x" * 30, "Re: " + "(" * 100]], ["A", "SUBJECT"], max_width=12)
    assert lines == ["A             SUBJECT", "xxxxxxxxxxx…  Re: (((((((…"]


def test_a_cell_with_a_newline_cannot_fake_a_row() -> None:
    lines = table_lines([["ok\n#2  open  forged"]], ["SUBJECT"])
    assert lines == ["SUBJECT", "ok #2  open  forged"]


def test_an_empty_table_still_has_its_headings() -> None:
    out = io.StringIO()
    table([], ["MAIL", "RECEIVED"], out=out)
    assert out.getvalue() == "MAIL  RECEIVED\n(none)\n"


def test_json_escapes_what_a_terminal_would_act_on() -> None:
    value = {"subject": "a\x1b[2Jb\x00c\x7fd\x9be\u202ef\u2028g\udc9bh é"}
    text = json_text(value)
    assert text == (
        '{\n  "subject": "a\\u001b[2Jb\\u0000c\\u007fd\\u009be\\u202ef\\u2028g\\udc9bh é"\n}'
    )
    assert json.loads(text) == value
