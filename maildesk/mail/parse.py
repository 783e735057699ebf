"""Parse stage: turn raw RFC 5322 bytes into a decoded, typed ParsedMail."""

from __future__ import annotations

import email.errors
import email.header
import email.policy
import email.utils
import mimetypes
import re
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesParser
from typing import NamedTuple
from urllib.parse import unquote

from maildesk.mail.htmltext import html_to_text, sanitise_html, tidy_lines
from maildesk.mail.message import ParsedAttachment, ParsedMail


class MalformedMail(Exception):
    """A mail that cannot be parsed; .reason is a short human-readable reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SURROGATES = re.compile(r"[\udc80-\udcff]")
_MSGID = re.compile(r"<[^<>]+>")
_MIME_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")
_CID_REF = re.compile(r"cid:([^\"'\s)>]+)", re.I)
# A MimeTypes() built without file names uses Python's own table, so that guessed extensions
# do not depend on the host's /etc/mime.types.
_MIME_TYPES = mimetypes.MimeTypes()
_MAX_FILENAME = 200


def _decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode with the declared charset, else UTF-8, else Windows-1252 with replacement."""
    for candidate in (charset, "utf-8"):
        if not candidate:
            continue
        # Like browsers, read Latin-1 as its Windows-1252 superset: mailers label € and curly
        # quotes that way.
        if candidate.lower().replace("_", "-") in ("iso-8859-1", "latin1", "latin-1"):
            candidate = "windows-1252"
        try:
            return data.decode(candidate)
        except (LookupError, ValueError):
            continue
    return data.decode("windows-1252", errors="replace")


def _fix_8bit(value: str) -> str:
    """Re-decode raw 8-bit bytes that the email package kept as surrogate escapes."""
    if _SURROGATES.search(value):
        return _decode_bytes(value.encode("utf-8", "surrogateescape"), None)
    return value


def _decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words leniently, whatever their declared charset."""
    try:
        parts = email.header.decode_header(value)
    except (email.errors.HeaderParseError, ValueError):
        return value
    # Once any encoded word is present, decode_header returns the plain chunks as
    # raw-unicode-escape bytes.
    return "".join(
        part if isinstance(part, str) else _decode_bytes(part, charset or "raw-unicode-escape")
        for part, charset in parts
    )


def _raw_headers(msg: EmailMessage, name: str) -> list[str]:
    """Return every value of a header: unfolded, 8-bit text decoded, control characters removed."""
    values = []
    for key, value in msg.raw_items():
        if key.lower() == name.lower():
            values.append(_CONTROL_CHARS.sub("", _fix_8bit("".join(str(value).splitlines()))))
    return values


def _first_header(msg: EmailMessage, name: str) -> str:
    """Return the first raw value of a header, or ""."""
    values = _raw_headers(msg, name)
    return values[0] if values else ""


def _addresses(msg: EmailMessage, *names: str) -> list[tuple[str, str]]:
    """Return (display name, addr-spec with lowercased domain) pairs from address headers."""
    found: dict[str, str] = {}
    values = [value for name in names for value in _raw_headers(msg, name)]
    # Names are decoded after splitting, so that an encoded comma cannot split an address in two.
    for name, addr in email.utils.getaddresses(values):
        local, at, domain = addr.strip().rpartition("@")
        if at and local and domain and not re.search(r"\s", addr.strip()):
            found.setdefault(f"{local}@{domain.lower()}", " ".join(_decode_words(name).split()))
    return [(name, addr) for addr, name in found.items()]


def _message_ids(value: str) -> list[str]:
    """Extract <message-id> tokens in order, without duplicates or folding whitespace."""
    return list(dict.fromkeys("".join(token.split()) for token in _MSGID.findall(value)))


def _date(value: str) -> datetime | None:
    """Parse a Date header into an aware datetime; dates without a zone are taken as UTC."""
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class _Leaf(NamedTuple):
    """A leaf MIME part with the headers that parsing needs, decoded once (the registry is slow)."""

    parent: str  # The subtype of the enclosing multipart, "" for a single-part mail.
    part: EmailMessage
    content_type: str
    filename: str | None
    disposition: str | None


def _leaves(part: EmailMessage, parent: str = "") -> Iterator[_Leaf]:
    """Yield the leaf parts of a mail, treating attached messages as leaves."""
    payload = part.get_payload()
    if part.get_content_maintype() == "multipart" and isinstance(payload, list):
        for sub in payload:
            if isinstance(sub, EmailMessage):
                yield from _leaves(sub, part.get_content_subtype())
    else:
        filename, disposition = part.get_filename(), part.get_content_disposition()
        yield _Leaf(parent, part, part.get_content_type(), filename, disposition)


def _is_body(leaf: _Leaf, content_type: str) -> bool:
    """Tell whether a part can be the mail body: the right type, unnamed and not an attachment."""
    # A multipart leaf lost its boundary: its raw text beats an empty ticket.
    broken = content_type == "text/plain" and leaf.content_type.startswith("multipart/")
    return (
        (leaf.content_type == content_type or broken)
        and leaf.disposition != "attachment"
        and leaf.filename is None
    )


def _part_text(part: EmailMessage) -> str:
    """Decode a text part's transfer encoding and charset, with "\\n" line endings."""
    data = part.get_payload(decode=True)
    text = _decode_bytes(data, part.get_content_charset()) if isinstance(data, bytes) else ""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _unflow(text: str, delsp: bool) -> str:
    """Join RFC 3676 format=flowed soft line breaks back into paragraphs."""
    out: list[str] = []
    pending: list[str] = []  # The pieces of a paragraph still being unwrapped.
    pending_depth = 0
    for line in text.split("\n"):
        content = line.lstrip(">")
        depth = len(line) - len(content)
        content = content[1:] if content.startswith(" ") else content  # Undo space-stuffing.
        flowed = content.endswith(" ") and content != "-- "
        if flowed and delsp:
            content = content[:-1]
        if pending and depth != pending_depth:
            # A change of quote depth ends a flowed paragraph (RFC 3676 section 4.5).
            out.append(_quoted(pending_depth, "".join(pending)))
            pending = []
        pending.append(content)
        pending_depth = depth
        if not flowed:
            out.append(_quoted(depth, "".join(pending)))
            pending = []
    if pending:
        out.append(_quoted(pending_depth, "".join(pending)))
    return "\n".join(out)


def _quoted(depth: int, text: str) -> str:
    """Render a line at a quote depth in the usual "> " style."""
    return (">" * depth + (" " + text if text else "")) if depth else text


def _body_text(part: EmailMessage) -> str:
    """Return the readable text of a text/plain part, unwrapping format=flowed."""
    text = _part_text(part)
    if str(part.get_param("format", "")).lower() == "flowed":
        text = _unflow(text, str(part.get_param("delsp", "")).lower() == "yes")
    return tidy_lines(text)


def _attachment(leaf: _Leaf, cids: set[str]) -> ParsedAttachment:
    """Build a ParsedAttachment from a non-body leaf part."""
    part, name = leaf.part, leaf.filename
    content_type = leaf.content_type
    if not _MIME_TYPE.fullmatch(content_type):
        content_type = "application/octet-stream"
    if name is not None:
        name = _fix_8bit(name)
        # Outlook puts RFC 2047 encoded words inside quoted parameters, against RFC 2231.
        name = _decode_words(name) if "=?" in name else name
    payload = part.get_payload()
    if isinstance(payload, list):
        # message/* parts carry parsed messages: write them back as .eml data with CRLF endings,
        # leaving the headers as they came so that signatures inside them still verify.
        inner = [m for m in payload if isinstance(m, EmailMessage)]
        as_sent = email.policy.default.clone(linesep="\r\n", refold_source="none")
        data = b"".join(m.as_bytes(policy=as_sent) for m in inner)
        if name is None and content_type == "message/rfc822" and inner:
            subject = " ".join(_decode_words(_first_header(inner[0], "Subject")).split())
            name = (subject or "message") + ".eml"
    else:
        decoded = part.get_payload(decode=True)
        data = decoded if isinstance(decoded, bytes) else b""
    content_id = "".join(_first_header(part, "Content-ID").split()).strip("<>") or None
    referenced = content_id is not None and content_id.lower() in cids
    inline_image = leaf.disposition == "inline" and content_type.startswith("image/")
    return ParsedAttachment(
        filename=sanitise_filename(name, content_type),
        content_type=content_type,
        data=data,
        inline=referenced or inline_image,
        content_id=content_id,
    )


# Bounds on what anyone may make the pipeline chew on: the email package spends seconds on a
# mail of thousands of parts, and the pipeline handles one mail at a time.
MAX_MAIL_BYTES = 50 * 1024 * 1024
MAX_BOUNDARY_LINES = 1000


def parse_mail(raw: bytes) -> ParsedMail:
    """Parse raw RFC 5322 bytes into a ParsedMail; raise MalformedMail if the mail is unusable."""
    if not raw or not raw.strip():
        raise MalformedMail("empty input")
    if len(raw) > MAX_MAIL_BYTES:
        raise MalformedMail(f"too large ({len(raw)} bytes, the limit is {MAX_MAIL_BYTES})")
    # Counting lines that start with "--" over-counts (signatures, quotes), never under-counts
    # the MIME boundaries, and costs one pass over the bytes.
    if raw.count(b"\n--") > MAX_BOUNDARY_LINES:
        raise MalformedMail(f"too many MIME parts (over {MAX_BOUNDARY_LINES})")
    try:
        return _parse(raw)
    except MalformedMail:
        raise
    except Exception as exc:  # The email package has no common base class for its failures.
        raise MalformedMail(f"cannot parse mail ({type(exc).__name__}: {exc})") from exc


def _parse(raw: bytes) -> ParsedMail:
    """Do the work of parse_mail, letting any exception escape."""
    msg = BytesParser(policy=email.policy.default).parsebytes(raw)
    if not isinstance(msg, EmailMessage) or not msg.keys():
        raise MalformedMail("no headers: not an email")
    senders = _addresses(msg, "From")
    if not senders:
        has_from = bool(_raw_headers(msg, "From"))
        raise MalformedMail("From header has no usable address" if has_from else "no From header")
    leaves = list(_leaves(msg))
    plains = [leaf for leaf in leaves if _is_body(leaf, "text/plain")]
    body_parts = plains[:1]
    if plains and plains[0].parent == "mixed":
        # Apple Mail splits a plain body around inline attachments into sibling text/plain parts.
        body_parts = [leaf for leaf in plains if leaf.parent == "mixed"]
    html_leaf = next((leaf for leaf in leaves if _is_body(leaf, "text/html")), None)
    text = "\n\n".join(filter(None, (_body_text(leaf.part) for leaf in body_parts)))
    html_source = _part_text(html_leaf.part) if html_leaf is not None else None
    if not text and html_source:
        text = html_to_text(html_source)
    cids = {unquote(ref).lower() for ref in _CID_REF.findall(html_source or "")}
    body_ids = {id(leaf.part) for leaf in [*plains, html_leaf] if leaf is not None}
    attachments = [
        _attachment(leaf, cids)
        for leaf in leaves
        if id(leaf.part) not in body_ids
        # Unnamed inline text parts left over are other renderings of the body, not attachments.
        and (
            leaf.disposition == "attachment"
            or leaf.filename is not None
            or leaf.content_type not in ("text/plain", "text/html")
        )
    ]
    message_ids = _message_ids(_first_header(msg, "Message-ID"))
    return ParsedMail(
        message=msg,
        message_id=message_ids[0] if message_ids else None,
        in_reply_to=_message_ids(" ".join(_raw_headers(msg, "In-Reply-To"))),
        references=_message_ids(" ".join(_raw_headers(msg, "References"))),
        subject=" ".join(_decode_words(_first_header(msg, "Subject")).split()),
        from_name=senders[0][0],
        from_address=senders[0][1],
        to=[addr for _, addr in _addresses(msg, "To")],
        cc=[addr for _, addr in _addresses(msg, "Cc")],
        delivered_to=[
            addr for _, addr in _addresses(msg, "Delivered-To", "X-Original-To", "Envelope-To")
        ],
        date=_date(_first_header(msg, "Date")),
        text=text,
        html=sanitise_html(html_source) if html_source is not None else None,
        attachments=attachments,
    )


def sanitise_filename(name: str | None, content_type: str) -> str:
    """Make an attachment name safe: no path, no control characters, at most 200, never empty."""
    # NFC, because Apple Mail sends decomposed accents.
    name = re.sub(r"[\t\r\n]+", " ", unicodedata.normalize("NFC", name or ""))
    name = "".join("_" if c in '<>:"|?*' else c for c in name if unicodedata.category(c)[0] != "C")
    name = " ".join(re.split(r"[/\\]", name)[-1].split()).strip(" .")
    if len(name) > _MAX_FILENAME:
        stem, dot, extension = name.rpartition(".")
        if dot and stem and len(extension) <= 16:
            name = stem[: _MAX_FILENAME - len(extension) - 1].rstrip() + "." + extension
        else:
            name = name[:_MAX_FILENAME].rstrip()
    return name or "attachment" + (_MIME_TYPES.guess_extension(content_type) or "")
