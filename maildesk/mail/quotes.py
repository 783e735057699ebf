"""Quoted history in replies: find where the new text of a reply ends.

Mail clients quote the mail they answer below an attribution line ("On … wrote:", "Le … a
écrit :") or an Outlook header block; maildesk's own mails carry a marker line above which the
reply is expected.
"""

from __future__ import annotations

import re

REPLY_ABOVE_MARKER: str = "##- Répondez au-dessus de cette ligne / Reply above this line -##"


_MARKER = re.compile(
    r"##-\s*r[ée]pondez|r[ée]pondez au-dessus de cette ligne|reply above this line", re.I
)
_ATTRIBUTION = re.compile(r"(On\s.*\d.*\swrote|Le\s.*\d.*\sa\s+écrit)\s*:", re.I)
_ORIGINAL_MESSAGE = re.compile(r"-{2,}\s*(Original Message|Message d.origine)\s*-{2,}", re.I)
_OUTLOOK_FROM = re.compile(r"\*?(From|De)\s*:", re.I)
_OUTLOOK_SENT = re.compile(r"\*?(Sent|Envoyé|Date)\s*:", re.I)
_OUTLOOK_SUBJECT = re.compile(r"\*?(Subject|Objet)\s*:", re.I)
_FORWARD_MARKERS = ("forwarded message", "message transféré", "début du message réexpédié")


def _outlook_header_block(lines: list[str], i: int) -> bool:
    """Tell whether an Outlook "From: / Sent: / Subject:" block, or its French form, starts at i."""
    if not _OUTLOOK_FROM.match(lines[i].strip()):
        return False
    # Forwarded messages use the same header block, but their content is new to the desk.
    if any(marker in " ".join(lines[max(0, i - 3) : i]).lower() for marker in _FORWARD_MARKERS):
        return False
    following = [line.strip() for line in lines[i + 1 : i + 7]]
    return any(map(_OUTLOOK_SENT.match, following)) and any(map(_OUTLOOK_SUBJECT.match, following))


def _starts_history(lines: list[str], i: int) -> bool:
    """Tell whether quoted history starts at line i."""
    line = lines[i].strip()
    following = lines[i + 1] if i + 1 < len(lines) else ""
    if _MARKER.search(line) or (line.endswith("##-") and _MARKER.search(following)):
        return True
    if _ORIGINAL_MESSAGE.fullmatch(line):
        return True
    # Gmail wraps long attribution lines, so try them joined with the next lines too; the length
    # limit keeps the regular expression from backtracking through long paragraphs.
    for n in (1, 2, 3):
        joined = " ".join(part.strip() for part in lines[i : i + n])
        if len(joined) < 400 and _ATTRIBUTION.fullmatch(joined):
            return True
    if re.fullmatch(r"_{5,}", line) and following:
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


def scrub_reply_addresses(text: str, desk_address: str) -> str:
    """Replace every subaddress of the desk (support+…@domain) with the plain desk address."""
    local, _, domain = desk_address.rpartition("@")
    pattern = re.compile(
        rf"(?<![\w.+-]){re.escape(local)}\+[^\s@<>\"'()\[\],;:]{{1,200}}@{re.escape(domain)}\b",
        re.I,
    )
    return pattern.sub(desk_address, text)
