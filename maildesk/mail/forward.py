"""Forwards: the original mail inside a mail that an agent forwarded to the desk.

An agent who forwards a customer's mail with `#new` on the first line asks the desk to open a
ticket for the original sender. The original comes either attached (message/rfc822, which
Thunderbird, Outlook and Apple Mail do on request: preferred, since its headers are the real
ones) or inline, below a separator and a header block in the shape of the agent's client:

    Gmail        ---------- Forwarded message --------- / ---------- Message transféré ---------
    Thunderbird  -------- Forwarded Message --------    / -------- Message transféré --------
    Apple Mail   Begin forwarded message:               / Début du message réexpédié :
    Outlook      From: … Sent: … To: … Subject:         / De : … Envoyé : … À : … Objet :
                 (below a rule of underscores on the web, or "-----Original Message-----")

The first forward found decides. Outlook writes the same header block above a reply's quoted
history as above a forward, so an Outlook reply reads as a forward too: `#new` on the first
line is what asks for one. Addresses are read by email.utils and email.headerregistry.
Only the first MAX_SCAN_CHARS of the text are looked at and no line longer than MAX_LINE is
read as a separator or a header, so that a hostile mail costs one bounded pass.
"""

from __future__ import annotations

import email.utils
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.headerregistry import Address
from typing import Literal

from maildesk.mail.message import MalformedMail, ParsedMail
from maildesk.mail.parse import parse_mail

# How much of a mail's text is searched for an inline forward, and the most kept of it.
MAX_SCAN_CHARS = 200_000
# A longer line cannot be a separator or a header line.
MAX_LINE = 1000
# The most lines that a forward's header block may take (To and Cc may wrap).
MAX_HEADER_LINES = 16
# How many blank lines may stand between a separator and its header block (Apple Mail: one).
_MAX_GAP = 2
# How far below "From:" Outlook puts "Sent:" and "Subject:" (To, Cc and Importance between).
_OUTLOOK_BLOCK = 8

_SEPARATOR = re.compile(
    r"-{2,}\s*(?:forwarded message|message transfere|original message|message d.origine)\s*-{2,}"
)
_BEGIN_FORWARDED = re.compile(r"(?:begin forwarded message|debut du message reexpedie)\s*:")
_RULE = re.compile(r"_{5,}")
_NUMERIC_ZONE = re.compile(r"[+-]\d{4}")

# The header names of forward blocks in English and French, without accents, and what they are.
_HEADER_NAMES = {
    "from": "from", "de": "from",
    "date": "date", "sent": "date", "envoye": "date",
    "subject": "subject", "objet": "subject", "sujet": "subject",
    "to": "to", "a": "to", "pour": "to",
    "cc": "cc", "cci": "cc", "bcc": "cc",
    "reply-to": "reply-to", "repondre a": "reply-to",
    "importance": "importance",
}


@dataclass(frozen=True)
class Forwarded:
    """The original mail of a forward: its sender, subject, date and text."""

    address: str  # The original sender's addr-spec, its domain lowercased.
    name: str  # Their display name, or "".
    subject: str
    date: datetime | None  # None when the client wrote the date in words of its own.
    date_text: str  # The date as the forward shows it.
    text: str
    via: Literal["attachment", "inline"]
    message_id: str | None = None  # Known only for an attached original.


def _fold(text: str) -> str:
    """Lowercase and drop accents: "Début du message réexpédié" reads as ASCII."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _mailbox(value: str) -> tuple[str, str] | None:
    """The one (display name, addr-spec) that a From value names, or None."""
    # Outlook 2010 writes "Name [mailto:addr]"; Gmail's HTML can leave "<mailto:addr>".
    value = value.replace("[mailto:", "<").replace("<mailto:", "<")
    if "<" in value and value.rstrip().endswith("]"):
        value = value.rstrip()[:-1] + ">"
    try:
        pairs = [(n, a) for n, a in email.utils.getaddresses([value]) if n or a]
    except (ValueError, IndexError, RecursionError):
        return None
    if len(pairs) != 1:
        return None
    name, addr = pairs[0]
    try:
        address = Address(addr_spec=addr)
    except (ValueError, IndexError, HeaderParseError):
        return None
    if not address.username or "." not in address.domain or "@" in name:
        return None
    return name.strip(), f"{address.username}@{address.domain.lower()}"


def _date(value: str) -> datetime | None:
    """An RFC 5322 date with its zone (as Thunderbird writes it) as an aware datetime, or None."""
    # Outlook's "Monday, January 12, 2026 2:30 PM" has no zone, and email.utils would read it
    # as 02:30 UTC ("PM" passes for a zone): a date without a numeric zone is left as text
    # rather than read wrong.
    words = value.split("(", 1)[0].split()
    if not words or not _NUMERIC_ZONE.fullmatch(words[-1]):
        return None
    try:
        fields = email.utils.parsedate_tz(value)
        if fields is None or fields[9] is None:
            return None
        return datetime.fromtimestamp(email.utils.mktime_tz(fields), UTC)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _attached(mail: ParsedMail) -> Forwarded | None:
    """The first attached message/rfc822 with a clear sender."""
    for attachment in mail.attachments:
        if attachment.content_type != "message/rfc822":
            continue
        try:
            inner = parse_mail(attachment.data)
        except MalformedMail:
            continue
        if inner.from_problem is not None:
            continue
        date_text = str(inner.message.get("Date", "") or "").strip()
        return Forwarded(
            address=inner.from_address, name=inner.from_name, subject=inner.subject,
            date=inner.date, date_text=date_text, text=inner.text, via="attachment",
            message_id=inner.message_id,
        )
    return None


def _unquote(line: str, depth: int) -> str:
    """The line without up to `depth` levels of "> " quoting."""
    for _ in range(depth):
        stripped = line.lstrip(" ")
        if not stripped.startswith(">"):
            break
        line = stripped[1:]
        line = line[1:] if line.startswith(" ") else line
    return line


def _quote_depth(line: str) -> int:
    """How many ">" quote the line."""
    depth = 0
    for char in line:
        if char == ">":
            depth += 1
        elif char not in " \t":
            break
    return depth


def _header(line: str) -> tuple[str, str] | None:
    """A forward header line ("From: …", "*De :* …", "Sujet : \t…") as (field, value)."""
    if len(line) > MAX_LINE or ":" not in line:
        return None
    name, _, value = line.partition(":")
    field = _HEADER_NAMES.get(" ".join(_fold(name).strip().strip("*").split()))
    if field is None:
        return None
    return field, value.strip().strip("*").strip()


def _outlook_block(lines: list[str], i: int) -> bool:
    """Whether an Outlook "From: / Sent: / Subject:" block, or its French, starts at line i."""
    found = _header(lines[i].strip())
    if found is None or found[0] != "from":
        return False
    following = lines[i + 1 : i + 1 + _OUTLOOK_BLOCK]
    fields = {header[0] for line in following if (header := _header(line.strip()))}
    return {"date", "subject"} <= fields


def _block_start(lines: list[str]) -> tuple[int, int] | None:
    """The first line of the first forward's header block, and its quote depth."""
    for i, raw in enumerate(lines):
        if len(raw) > MAX_LINE or not raw.strip():
            continue
        depth = _quote_depth(raw)
        line = _fold(_unquote(raw, depth).strip())
        if _SEPARATOR.fullmatch(line) or _BEGIN_FORWARDED.fullmatch(line) or (
            _RULE.fullmatch(line)
        ):
            start = i + 1
            gap = 0
            while start < len(lines) and not _unquote(lines[start], depth).strip():
                start, gap = start + 1, gap + 1
            if gap > _MAX_GAP or start == len(lines):
                continue
            if _RULE.fullmatch(line) and not _outlook_block(
                [_unquote(x, depth) for x in lines[start : start + _OUTLOOK_BLOCK + 1]], 0
            ):
                continue
            return start, depth
        if line.startswith(("from", "de", "*from", "*de")) and _outlook_block(
            [_unquote(x, depth) for x in lines[i : i + _OUTLOOK_BLOCK + 1]], 0
        ):
            return i, depth
    return None


def _inline(mail: ParsedMail) -> Forwarded | None:
    """The forward written into the text, below a separator or as an Outlook header block."""
    lines = mail.text[:MAX_SCAN_CHARS].replace("\r\n", "\n").split("\n")
    found = _block_start(lines)
    if found is None:
        return None
    start, depth = found
    headers: dict[str, str] = {}
    last: str | None = None
    end = start
    for end in range(start, min(len(lines), start + MAX_HEADER_LINES)):
        line = _unquote(lines[end], depth).strip()
        if not line:
            break
        header = _header(line)
        if header is not None:
            last = header[0]
            headers.setdefault(last, header[1])
        elif last in ("to", "cc") and len(line) <= MAX_LINE:
            headers[last] += " " + line  # Outlook wraps a long list of recipients.
        else:
            break
    else:
        end += 1
    sender = _mailbox(headers.get("from", ""))
    if sender is None:
        return None
    body = [_unquote(line, depth) for line in lines[end:]]
    date_text = headers.get("date", "")
    return Forwarded(
        address=sender[1], name=sender[0], subject=headers.get("subject", ""),
        date=_date(date_text), date_text=date_text, text="\n".join(body).strip(), via="inline",
    )


def forwarded_original(mail: ParsedMail) -> Forwarded | None:
    """The original of a forwarded mail: attached if there is one, else inline; or None."""
    return _attached(mail) or _inline(mail)
