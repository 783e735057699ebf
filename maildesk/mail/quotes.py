"""Quoted history in replies: find where the new text of a reply ends.

Mail clients quote the mail they answer below an attribution line ("On … wrote:", "Le … a
écrit :", "Am … schrieb …:", "El … escribió:", "Il … ha scritto:"), an "Original Message"
separator or an Outlook header block ("From:/Sent:/To:/Subject:" and its translations);
maildesk's own mails carry a marker line above which the reply is expected. The notification an
agent answers carries their signed reply address, so `scrub_reply_addresses` removes any such
address that survives in a text maildesk relays.
"""

from __future__ import annotations

import functools
import re

REPLY_ABOVE_MARKER: str = "##- Répondez au-dessus de cette ligne / Reply above this line -##"

# Lines longer than these cannot be a marker, a separator, a header line or an attribution
# (Gmail wraps the last over at most three lines). Checking the length first keeps every
# regular expression below from working through long paragraphs.
_MAX_LINE = 1000
_MAX_ATTRIBUTION = 400
_ATTRIBUTION_LINES = 3
# How far above a header block a forward marker may stand ("From:" follows it, or a blank line).
_FORWARD_LOOKBEHIND = 4
# How far below "From:" Outlook puts "Sent:" and "Subject:" (To, Cc and Importance come between).
_HEADER_BLOCK_LINES = 6

_MARKER = re.compile(
    r"##-\s*r[ée]pondez|r[ée]pondez au-dessus de cette ligne|reply above this line", re.I
)
# Every attribution starts with a word that these match, which skips most lines cheaply.
_ATTRIBUTION_START = re.compile(r"(?:On|Le|Am|El|Il)\s", re.I)
# Gmail, Apple Mail and Thunderbird in English, French, German, Spanish and Italian. Each form
# needs a digit (the date) after its first word; "\D*\d" cannot backtrack, and the German form
# takes its first "schrieb", so that a match costs a few scans of the line, not one per pair of
# positions (the caller also checks for the final colon first).
_ATTRIBUTION = re.compile(
    r"(?:On\s\D*\d.*\swrote"
    r"|Le\s\D*\d.*\sa\s+écrit"
    r"|Am\s\D*\d.*?\sschrieb(?:\s.*)?"
    r"|El\s\D*\d.*\sescribió"
    r"|Il\s\D*\d.*\sha\s+scritto"
    r")\s*:",
    re.I,
)
_ORIGINAL_MESSAGE = re.compile(
    r"-{2,}\s*(?:Original Message|Message d.origine|Ursprüngliche Nachricht|Original-Nachricht"
    r"|Mensaje original|Messaggio originale)\s*-{2,}",
    re.I,
)
_RULE = re.compile(r"_{5,}")
# Outlook desktop and Outlook on the web, with or without the stars of a bold-to-text rendering.
_OUTLOOK_FROM = re.compile(r"\*{0,2}(?:From|De|Von|Da)\s*:", re.I)
_OUTLOOK_SENT = re.compile(
    r"\*{0,2}(?:Sent|Date|Envoyé|Gesendet|Datum|Enviado|Fecha|Inviato|Data)\s*:", re.I
)
_OUTLOOK_SUBJECT = re.compile(r"\*{0,2}(?:Subject|Objet|Betreff|Asunto|Oggetto)\s*:", re.I)
# Gmail, Thunderbird and Apple Mail forwards, in the five languages.
_FORWARD_MARKERS = (
    "forwarded message",
    "begin forwarded message",
    "message transféré",
    "message réexpédié",
    "weitergeleitete nachricht",
    "weitergeleiteten nachricht",
    "mensaje reenviado",
    "messaggio inoltrato",
)


def _outlook_header_block(lines: list[str], i: int) -> bool:
    """Tell whether an Outlook "From: / Sent: / Subject:" block, or a translation, starts at i."""
    if len(lines[i]) > _MAX_LINE or not _OUTLOOK_FROM.match(lines[i].strip()):
        return False
    # Forwarded messages use the same header block, but their content is new to the desk.
    above = " ".join(lines[max(0, i - _FORWARD_LOOKBEHIND) : i]).lower()
    if any(marker in above for marker in _FORWARD_MARKERS):
        return False
    following = [line.strip() for line in lines[i + 1 : i + 1 + _HEADER_BLOCK_LINES]]
    following = [line for line in following if len(line) <= _MAX_LINE]
    return any(map(_OUTLOOK_SENT.match, following)) and any(map(_OUTLOOK_SUBJECT.match, following))


def _attribution(lines: list[str], i: int) -> bool:
    """Tell whether an attribution line, perhaps wrapped over up to three lines, starts at i."""
    if not _ATTRIBUTION_START.match(lines[i].strip()):
        return False
    parts: list[str] = []
    for line in lines[i : i + _ATTRIBUTION_LINES]:
        parts.append(line.strip())
        joined = " ".join(parts)
        if len(joined) > _MAX_ATTRIBUTION:
            return False
        if joined.endswith(":") and _ATTRIBUTION.fullmatch(joined):
            return True
    return False


def _starts_history(lines: list[str], i: int) -> bool:
    """Tell whether quoted history starts at line i."""
    line = lines[i].strip()
    if len(line) > _MAX_LINE:
        return False
    following = lines[i + 1] if i + 1 < len(lines) else ""
    if _MARKER.search(line):
        return True
    # A client re-wrapping the marker can leave its opening "##-" alone on a line.
    if line.endswith("##-") and len(following) <= _MAX_LINE and _MARKER.search(following):
        return True
    if _ORIGINAL_MESSAGE.fullmatch(line) or _attribution(lines, i):
        return True
    if _RULE.fullmatch(line) and following:
        return _outlook_header_block(lines, i + 1)
    return _outlook_header_block(lines, i)


def strip_quoted_reply(text: str) -> str:
    """Return only the new part of a reply, without the quoted history below it."""
    lines = text.replace("\r\n", "\n").split("\n")
    cut = next((i for i in range(len(lines)) if _starts_history(lines, i)), len(lines))
    kept = lines[:cut]
    while kept and (not kept[-1].strip() or kept[-1].lstrip().startswith(">")):
        kept.pop()
    return "\n".join(kept).strip() or text.strip()


@functools.lru_cache(maxsize=8)
def _reply_address_pattern(desk_address: str) -> re.Pattern[str]:
    """The one expression that finds every subaddress of the desk address in a text."""
    local, _, domain = desk_address.rpartition("@")
    local, domain = re.escape(local), re.escape(domain)
    plus, at = r"(?:\+|%2B)", r"(?:@|%40)"  # Also as percent-escapes, as in mailto: links.
    detail = r"[^\s@<>\"'()\[\],;:]{1,200}"
    return re.compile(
        # Not the tail of a longer local part (xsupport+…), nor a longer domain after it.
        rf"(?<![\w.!#$%&'*+/=?^`{{|}}~-])"
        rf"(?:\"{local}{plus}[^\"\r\n]{{1,200}}\"|{local}{plus}{detail})"
        rf"{at}{domain}(?![\w-]|\.[\w-])",
        re.I,
    )


def scrub_reply_addresses(text: str, desk_address: str) -> str:
    """Replace every subaddress of the desk (support+…@domain) with the plain desk address."""
    if "@" not in desk_address:
        return text
    return _reply_address_pattern(desk_address).sub(desk_address, text)
