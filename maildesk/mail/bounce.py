"""Bounces: recognise a delivery status notification and read what it says about our mail.

A standard DSN (RFC 3464) has a message/delivery-status part, which the email package splits
into field blocks, and the original in a message/rfc822 or text/rfc822-headers part. For the
plain-text bounces of Exim and qmail, and what the reports leave out, the status, the failed
address and the original's Message-ID are looked for in the text. All work is bounded: the first
64 KB of a text part, the first 50 recipient groups, the first 200 parts. Pure: no I/O.
"""

from __future__ import annotations

import binascii
import codecs
import email.policy
import email.utils
import quopri
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser, HeaderParser

from maildesk.mail.htmltext import html_to_text
from maildesk.mail.message import ParsedMail

MAX_TEXT = 64 * 1024
MAX_RECIPIENTS = 50
MAX_PARTS = 200
MAX_DIAGNOSTIC = 300

_STATUS_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})
_ORIGINAL_TYPES = frozenset({"message/rfc822", "message/global", "text/rfc822-headers"})
_ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
_DAEMONS = frozenset({"mailer-daemon", "mailerdaemon", "mail-daemon", "postmaster"})
# Charsets that Python knows but that turn plain ASCII into anything, or decode slowly.
_DENIED_CODECS = frozenset({"punycode", "idna", "raw-unicode-escape", "unicode-escape", "utf-7"})

_ENHANCED = re.compile(r"(?<![\w.])([245])\.(\d{1,3})\.(\d{1,3})(?!\w|\.\d)")
# Only the reply codes that a refused delivery uses, so that "500 MB" or a year is no status.
_SMTP_REPLY = re.compile(r"(?<![\w.])(4(?:21|5[0-5])|5(?:5[0-5]|30|41))(?=[ -]\S)")
_MSGID = re.compile(r"<[^<>]{1,500}>")
_QUOTED_MSGID = re.compile(r"^[ \t>]*Message-ID:[ \t]*\n?[ \t]*(<[^<>\s]{1,500}>)", re.I | re.M)
_ADDRESS = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,20}"
)
_TYPE_PREFIX = re.compile(r"^\s*[A-Za-z0-9-]{1,30}\s*;\s*")
_VERP_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Header lines of a quoted original whose addresses are not recipients.
_NOT_RECIPIENT_LINE = re.compile(
    r"^[ \t>]*(message-id|in-reply-to|references|received|return-path|from|sender|reply-to"
    r"|[a-z-]*signature|x-[a-z-]+|arc-[a-z-]+|list-[a-z-]+)[ \t]*:", re.I
)
# Where a plain-text bounce starts quoting the mail that failed.
_COPY_MARKER = re.compile(
    r"this is a copy of the message|below this line is a copy of the message"
    r"|original message follows|undelivered message follows|original message headers"
    r"|message headers follow|included is a copy of the message", re.I
)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|returned mail|returned to sender|delivery status notification|delivery fail"
    r"|mail delivery failed|failure notice|delayed mail|delivery delayed|not delivered"
    r"|could not be delivered|mail system error|warning: message .{0,80} delayed|non remis"
    r"|non distribuable|unzustellbar|non recapitabile", re.I
)
_BOUNCE_MARKER = re.compile(
    r"created automatically by mail delivery software|this is the qmail-send program"
    r"|this is the mail system at host|wasn't able to deliver your message"
    r"|delivery has failed to these recipients|your message did not reach some or all"
    r"|the original message was received at|could not be delivered to one or more"
    r"|your message (?:couldn't|could not|wasn't|was not) (?:be )?delivered"
    r"|delivery to the following recipients? (?:failed|has been delayed)"
    r"|the following addresses had (?:permanent fatal|transient non-fatal) errors"
    r"|has not yet been delivered to one or more", re.I
)
_PERMANENT_WORDS = re.compile(
    r"permanent (?:error|failure)|given up|giving up|retry timeout exceeded|fatal error", re.I
)
_DELAY_WORDS = re.compile(
    r"not yet been delivered|has been delayed|is delayed|delivery delayed|warning only"
    r"|will (?:retry|keep trying|continue trying|be retried)|still (?:trying|being retried)"
    r"|transient non-fatal|temporary (?:problem|failure)", re.I
)
_REPORTING_MTA = re.compile(
    r"qmail-send program at ([\w.-]+?)\.?\s*$|mail system at host ([\w.-]+?)\.?\s*$"
    r"|generating server:\s*([\w.-]+)", re.I | re.M
)
_RETURNED = re.compile(r"returned '([^']{1,600})'", re.I)


@dataclass(frozen=True)
class RecipientStatus:
    """What a DSN says about one recipient of the mail we sent."""

    # The failed recipient (Final-Recipient, else Original-Recipient, else what the
    # human-readable part names), with its domain lowercased.
    address: str
    status: str  # "5.1.1", "4.4.7", …; "5.0.0"/"4.0.0" when only the class is known.
    action: str  # "failed", "delayed", "delivered", "relayed" or "expanded".
    diagnostic: str  # The Diagnostic-Code text, on one line, at most 300 characters.

    @property
    def permanent(self) -> bool:
        """Whether the status is a permanent failure (class 5)."""
        return self.status.startswith("5")


@dataclass(frozen=True)
class Bounce:
    """What a delivery status notification says about one mail we sent."""

    original_message_ids: tuple[str, ...]  # The "<…>" ids of the mail that failed, best first.
    recipients: tuple[RecipientStatus, ...]
    reporting_mta: str | None


def read_bounce(mail: ParsedMail) -> Bounce | None:
    """The bounce this mail is, or None when it is not a delivery status notification."""
    msg = mail.message
    report_type = ""
    if msg.get_content_type() == "multipart/report":
        value = msg.get_param("report-type", "")
        # An RFC 2231 value comes as (charset, language, text).
        report_type = str(value[2] if isinstance(value, tuple) else value).strip().lower()
        # A read receipt or an abuse report is a report too, but says nothing about delivery.
        if report_type and f"message/{report_type}" not in _STATUS_TYPES:
            return None
    parts = list(_leaves(msg))
    status_part = next((p for p in parts if p.get_content_type() in _STATUS_TYPES), None)
    text = _human_text(parts)
    if status_part is None and not report_type and not _looks_like_bounce(mail, text):
        return None
    body, copy = _split_copy(text)
    originals = [p for p in parts if p.get_content_type() in _ORIGINAL_TYPES]
    headers = [h for h in map(_original_headers, originals) if h is not None]
    if not headers and copy:
        headers = [HeaderParser(policy=email.policy.default).parsestr(copy.lstrip("\n"))]
    from_text = _text_recipients(body, mail, headers)
    per_message: dict[str, str] = {}
    recipients: list[RecipientStatus] = []
    if status_part is not None and (blocks := _status_blocks(status_part)):
        per_message = _fields(blocks[0])
        recipients = _report_recipients(blocks, from_text)
    ids = [i for header in headers for i in _message_ids(_field(header, "Message-ID"))]
    ids += _message_ids(per_message.get("x-original-message-id", ""))
    quoted = _QUOTED_MSGID.search(copy or text)
    ids += [quoted.group(1)] if quoted else []
    # Exchange and Microsoft 365 set In-Reply-To on their NDRs. References is left out: it names
    # the earlier mails of the thread, which did not fail.
    ids += mail.in_reply_to
    mta = _TYPE_PREFIX.sub("", per_message.get("reporting-mta", "")).strip()
    if not mta and (found := _REPORTING_MTA.search(body)):
        mta = next(g for g in found.groups() if g)
    return Bounce(tuple(dict.fromkeys(ids)), tuple(recipients or from_text), mta.lower() or None)


def verp_token(address: str, desk_address: str) -> str | None:
    """The token of a VERP return path `<desk local>+bounce-<token>@<desk domain>`, else None."""
    addr = email.utils.parseaddr(address)[1] or address.strip().strip("<>")
    local, at, domain = addr.rpartition("@")
    desk_local, desk_at, desk_domain = desk_address.strip().rpartition("@")
    if not (at and desk_at) or domain.lower() != desk_domain.lower():
        return None
    prefix = f"{desk_local}+bounce-"
    if not local.lower().startswith(prefix.lower()):
        return None
    token = local[len(prefix) :]
    return token if _VERP_TOKEN.fullmatch(token) else None


def _leaves(msg: Message) -> Iterator[Message]:
    """Yield the first MAX_PARTS leaf parts, not looking inside attached messages."""
    # An attached message is the original of a bounce, or a bounce that a customer forwards:
    # what is inside it says nothing about the mail itself.
    stack, seen = [msg], 0
    while stack and seen < MAX_PARTS:
        part = stack.pop()
        seen += 1
        payload = part.get_payload()
        if part.get_content_maintype() == "multipart" and isinstance(payload, list):
            stack.extend(reversed([sub for sub in payload if isinstance(sub, Message)]))
        else:
            yield part


def _decode(data: bytes, charset: str | None) -> str:
    """Decode text cut at MAX_TEXT: the declared charset, else UTF-8, else Windows-1252."""
    for name in (charset, "utf-8"):
        try:
            info = codecs.lookup(name or "")
        except LookupError:
            continue
        if info.name in _DENIED_CODECS or not getattr(info, "_is_text_encoding", True):
            continue
        try:
            # Not final: a character cut in two at the bound is dropped, not an error.
            return info.incrementaldecoder().decode(data, final=False)
        except ValueError:
            continue
    return data.decode("cp1252", errors="replace")


def _leading_text(part: Message) -> str:
    """The first MAX_TEXT bytes of a text part, decoded; the rest is never decoded."""
    payload = part.get_payload()
    if not isinstance(payload, str):
        return ""
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    # Encoded text is ASCII, and at most three times as long as the text it holds.
    raw = payload[: MAX_TEXT * 3].encode("ascii", "ignore")
    if cte == "base64":
        packed = b"".join(raw.split())
        try:
            data = binascii.a2b_base64(packed[: len(packed) // 4 * 4])
        except binascii.Error:
            data = b""
    elif cte == "quoted-printable":
        data = quopri.decodestring(raw)
    else:
        # Unencoded 8-bit text: only get_payload(decode=True) gives back its bytes as sent
        # (get_payload() replaces them); that copies the part, but decodes nothing.
        whole = part.get_payload(decode=True)
        data = whole[:MAX_TEXT] if isinstance(whole, bytes) else b""
    text = _decode(data[:MAX_TEXT], part.get_content_charset())
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _human_text(parts: list[Message]) -> str:
    """The human-readable text: the first text/plain part, else the first text/html one."""
    for wanted in ("text/plain", "text/html"):
        for part in parts:
            if part.get_content_type() == wanted and part.get_content_disposition() != "attachment":
                text = _leading_text(part)
                return html_to_text(text) if wanted == "text/html" else text
    return ""


def _looks_like_bounce(mail: ParsedMail, text: str) -> bool:
    """Whether a mail with no delivery report is still a mailer daemon's bounce."""
    local = mail.from_address.rpartition("@")[0].lower()
    daemon = local in _DAEMONS or "X-Failed-Recipients" in mail.message
    marker = _BOUNCE_MARKER.search(text) is not None
    if daemon and (marker or _BOUNCE_SUBJECT.search(mail.subject)):
        return True
    # A person may paste a bounce into a mail; a bounce is sent with the null return path.
    return marker and _field(mail.message, "Return-Path").strip() == "<>"


def _split_copy(text: str) -> tuple[str, str]:
    """Split a bounce's text into what the daemon says and the quoted original, if marked."""
    found = _COPY_MARKER.search(text)
    if found is None:
        return text, ""
    # The marker's whole line belongs to neither side.
    end = text.find("\n", found.end())
    return text[: text.rfind("\n", 0, found.start()) + 1], text[end:] if end >= 0 else ""


def _original_headers(part: Message) -> Message | None:
    """The header section of the original mail that a part holds."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return next((m for m in payload if isinstance(m, Message)), None)
    return HeaderParser(policy=email.policy.default).parsestr(_leading_text(part).lstrip("\n"))


def _status_blocks(part: Message) -> list[Message]:
    """The field blocks of a delivery-status part: per-message first, then per recipient."""
    payload = part.get_payload()
    blocks = [b for b in payload if isinstance(b, Message)] if isinstance(payload, list) else []
    if part.get_content_type() == "message/global-delivery-status" and len(blocks) == 1:
        # The email package splits only message/delivery-status into blocks; a global one
        # (RFC 6533) comes as one message whose body holds the recipient blocks.
        data = b"Content-Type: message/delivery-status\n\n" + blocks[0].as_bytes()[:MAX_TEXT]
        return _status_blocks(BytesParser(policy=email.policy.default).parsebytes(data))
    return blocks[: MAX_RECIPIENTS + 1]


def _field(msg: Message, name: str) -> str:
    """The first raw value of a field, on one line, 8-bit text decoded; "" when absent."""
    return _fields(msg).get(name.lower(), "")


def _fields(block: Message) -> dict[str, str]:
    """The fields of a block by lowercase name, first value kept, each on one line."""
    found: dict[str, str] = {}
    for key, value in block.raw_items():
        found.setdefault(key.lower(), _one_line(str(value)))
    return found


def _one_line(value: str) -> str:
    """Unfold a value, decode raw 8-bit bytes, drop control characters."""
    if re.search(r"[\udc80-\udcff]", value):
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", errors="replace")
    return " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", value).split())


def _message_ids(value: str) -> list[str]:
    """The <message-id> tokens of a value, folding whitespace removed."""
    return ["".join(token.split()) for token in _MSGID.findall(value)]


def _address(value: str) -> str:
    """An address from a recipient field ("rfc822; Addr"), domain lowercased; "" if none."""
    value = _TYPE_PREFIX.sub("", value).strip()
    if len(value) > 320:
        return ""
    addr = email.utils.parseaddr(value)[1] or value.strip("<>")
    local, at, domain = addr.rpartition("@")
    if not (at and local and domain) or re.search(r"\s", addr):
        return ""
    return _lower_domain(addr)


def _lower_domain(address: str) -> str:
    """An addr-spec with its domain lowercased."""
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"


def _key(address: str) -> str:
    """Compare addresses without case and without a +tag."""
    local, _, domain = address.lower().rpartition("@")
    return f"{local.split('+')[0]}@{domain}"


def _report_recipients(
    blocks: list[Message], from_text: list[RecipientStatus]
) -> list[RecipientStatus]:
    """Read the per-recipient blocks, the human-readable text filling what they leave out."""
    by_address = {_key(r.address): r for r in from_text}
    found: list[RecipientStatus] = []
    for block in blocks:
        fields = _fields(block)
        if not ({"final-recipient", "original-recipient", "action", "status"} & fields.keys()):
            continue  # The per-message block, or an empty one.
        address = _address(fields.get("final-recipient", ""))
        address = address or _address(fields.get("original-recipient", ""))
        if not address and len(from_text) > len(found):
            address = from_text[len(found)].address
        text = by_address.get(_key(address)) if address else None
        diagnostic = _TYPE_PREFIX.sub("", fields.get("diagnostic-code", ""))
        action = fields.get("action", "").lower().split(" ")[0]
        status = _status(fields.get("status", ""), diagnostic, text, action)
        if action not in _ACTIONS:
            action = {"5": "failed", "4": "delayed"}.get(status[0], "delivered")
        if not diagnostic and text is not None:
            diagnostic = text.diagnostic
        found.append(RecipientStatus(address, status, action, diagnostic[:MAX_DIAGNOSTIC]))
    return found


def _status(field: str, diagnostic: str, text: RecipientStatus | None, action: str) -> str:
    """The most precise status code that a recipient block, or the text for it, gives."""
    code = _ENHANCED.search(field)
    if code and code.group(0)[1:] != ".0.0":
        return code.group(0)
    # Exim always reports 5.0.0: the code in its Diagnostic-Code, or in its text, says more.
    for source in (diagnostic, text.status if text is not None else ""):
        detail = _ENHANCED.search(source)
        if detail and detail.group(0)[1:] != ".0.0":
            if code is None or detail.group(1) == code.group(1):
                return detail.group(0)
    if code:
        return code.group(0)
    if reply := _SMTP_REPLY.search(diagnostic):
        return f"{reply.group(1)[0]}.0.0"
    if text is not None:
        return text.status
    return {"delayed": "4.0.0", "delivered": "2.0.0", "relayed": "2.0.0", "expanded": "2.0.0"}.get(
        action, "5.0.0"
    )


def _text_recipients(
    text: str, mail: ParsedMail, originals: Iterable[Message]
) -> list[RecipientStatus]:
    """Find the failed addresses in what a daemon wrote, each with its status and diagnostic."""
    ours = {_key(a) for a in [mail.from_address, *mail.to, *mail.cc, *mail.delivered_to]}
    for original in originals:
        ours |= {_key(_address(_field(original, name))) for name in ("From", "Sender")}
    lines, skipping = text.split("\n"), False
    for n, line in enumerate(lines):
        # Blank out header lines that name a sender or a mail, and their continuation lines.
        skipping = bool(_NOT_RECIPIENT_LINE.match(line)) or (skipping and line[:1] in (" ", "\t"))
        lines[n] = "" if skipping else line
    text = "\n".join(lines)
    failed = [a.strip() for a in _field(mail.message, "X-Failed-Recipients").split(",")]
    spots = [(m.start(), m.group(0)) for m in _ADDRESS.finditer(text)]
    candidates: dict[str, str] = {}
    for address in [*map(_address, failed), *(_lower_domain(found) for _, found in spots)]:
        local = address.rpartition("@")[0].lower()
        if address and local not in _DAEMONS and _key(address) not in ours:
            candidates.setdefault(_key(address), address)
            if len(candidates) == MAX_RECIPIENTS:
                break
    keyed = [(pos, _key(spot)) for pos, spot in spots]
    anywhere = _text_code(text, [(0, len(text))])
    found = []
    for key, address in candidates.items():
        # An address's own lines run from where it is named to where another one is.
        spans, start = [], None
        for pos, spot_key in keyed:
            if spot_key == key:
                start = pos if start is None else start
            elif start is not None and spot_key in candidates:
                spans.append((start, pos))
                start = None
        if start is not None:
            spans.append((start, len(text)))
        code, line = _text_code(text, spans)
        code, line = (code, line) if code else anywhere
        # What a daemon says of one address among several is said next to that address.
        context = "\n".join(text[a:b] for a, b in spans) if len(candidates) > 1 else text
        permanent = _PERMANENT_WORDS.search(context) is not None
        if code:
            failing = code[0] == "5" or permanent
        else:
            failing = permanent or _DELAY_WORDS.search(context) is None
            code = "5.0.0" if failing else "4.0.0"
        found.append(RecipientStatus(address, code, "failed" if failing else "delayed", line))
    return found


def _text_code(text: str, spans: list[tuple[int, int]]) -> tuple[str, str]:
    """The first failure code in the first span that has one, and its line as a diagnostic."""
    for start, end in spans:
        for pattern in (_ENHANCED, _SMTP_REPLY):
            for code in pattern.finditer(text, start, end):
                if code.group(0)[0] == "2":
                    continue  # A transcript's "250 2.1.5 Ok" lines are no failure.
                status = code.group(0) if pattern is _ENHANCED else f"{code.group(0)[0]}.0.0"
                return status, _diagnostic_line(text, code.start())
    return "", ""


def _diagnostic_line(text: str, pos: int) -> str:
    """The line that holds a code, from the SMTP reply on, at most MAX_DIAGNOSTIC characters."""
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    line = text[start : end if end >= 0 else len(text)]
    reply = _SMTP_REPLY.search(line)
    if returned := _RETURNED.search(line):
        line = returned.group(1)
    elif reply and reply.start() <= pos - start:
        line = line[reply.start() :]
    return _one_line(line)[:MAX_DIAGNOSTIC]
