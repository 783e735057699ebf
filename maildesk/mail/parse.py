"""Parse stage: turn raw RFC 5322 bytes into a decoded, typed ParsedMail.

Nothing reaches the email package before `limits.scan_shape` has bounded the mail's size and
shape, and the package reads the MIME headers with `limits.POLICY`. Every text that leaves
here (subject, names, filenames, body) has been decoded with a charset fit for mail and
cleaned of controls and bidi marks by `clean_text`.
"""

from __future__ import annotations

import binascii
import email.utils
import mimetypes
import re
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote

from maildesk.mail.htmltext import clean_text, html_to_text, sanitise_html, tidy_lines
from maildesk.mail.limits import (
    POLICY,
    TRUNCATION_MARKER,
    ParseLimits,
    decode_text,
    fix_8bit,
    has_bare_cr,
    rfc2231_text,
    scan_shape,
)
from maildesk.mail.message import MalformedMail, ParsedAttachment, ParsedMail, SpooledFile
from maildesk.mail.sparse import SparseMail, read_sparse
from maildesk.mail.spool import SPOOL_FIELD, HoleOutside, discard, spool_large_parts

# The default bounds, under the names they had before ParseLimits.
MAX_MAIL_BYTES = ParseLimits.max_mail_bytes
MAX_BOUNDARY_LINES = ParseLimits.max_parts

_MSGID = re.compile(r"<[^<>]+>")
_MIME_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")
_CID_REF = re.compile(r"cid:([^\"'\s)>]+)", re.I)
# A MimeTypes() built without file names uses Python's own table, so that guessed extensions
# do not depend on the host's /etc/mime.types.
_MIME_TYPES = mimetypes.MimeTypes()
_MAX_FILENAME = 200
# RFC 2047: =?charset?encoding?text?=, the text without "?" or space (RFC 2047 wants ASCII,
# some mailers put raw UTF-8 in). No ".*?" as in email.header, so that a thousand "=?" without
# an end cost one scan, not one each.
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([qQbB])\?([^?\s]*)\?=")
_HIDDEN_WORD = re.compile("\ue000([0-9]+)\ue001")
_ATEXT = r"[\w!#$%&'*+/=?^`{|}~-]"
_ADDR_SPEC = re.compile(
    rf"(?:{_ATEXT}+(?:\.{_ATEXT}+)*|\"(?:[^\"\\\s]|\\\S)+\")@[\w-]+(?:\.[\w-]+)+"
)
_ADDR_IN_TEXT = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*@[\w-]+(?:\.[\w-]+)+")


def _word_bytes(encoding: str, text: str) -> bytes | None:
    """The octets of one encoded word's text, or None if they cannot be decoded."""
    raw = text.encode("utf-8", "surrogateescape")  # Raw 8-bit text was read as UTF-8.
    if encoding in "qQ":
        return binascii.a2b_qp(raw, header=True)
    try:
        return binascii.a2b_base64(raw + b"=" * (-len(raw) % 4))  # Postel: add missing padding.
    except binascii.Error:
        return None


def _decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words leniently, each with a charset fit for mail."""
    if "=?" not in value:
        return value
    chunks: list[str | tuple[str, bytes]] = []  # Plain text, or a charset and its octets.
    pos = 0
    for word in _ENCODED_WORD.finditer(value):
        between = value[pos : word.start()]
        # Whitespace between two encoded words is not part of the text (RFC 2047, 6.2).
        if between and not (chunks and isinstance(chunks[-1], tuple) and not between.strip()):
            chunks.append(between)
        charset = word.group(1).partition("*")[0].lower()  # RFC 2231 adds *language.
        data = _word_bytes(word.group(2), word.group(3))
        last = chunks[-1] if chunks else None
        if data is None:
            chunks.append(word.group(0))
        elif isinstance(last, tuple) and last[0] == charset:
            # Adjacent words in one charset are decoded together: a character may straddle them.
            chunks[-1] = (charset, last[1] + data)
        else:
            chunks.append((charset, data))
        pos = word.end()
    chunks.append(value[pos:])
    return "".join(c if isinstance(c, str) else decode_text(c[1], c[0]) for c in chunks)


def _raw_headers(msg: EmailMessage, name: str) -> list[str]:
    """Return every value of a header: 8-bit text decoded, on one line, controls removed."""
    values = []
    for key, value in msg.raw_items():
        if key.lower() == name.lower():
            values.append(clean_text(fix_8bit(str(value)), multiline=False))
    return values


def _first_header(msg: EmailMessage, name: str) -> str:
    """Return the first raw value of a header, or ""."""
    values = _raw_headers(msg, name)
    return values[0] if values else ""


def _split_addresses(value: str) -> list[tuple[str, str]]:
    """Split an address header into (decoded display name, raw address) pairs."""
    # Encoded words are decoded only after splitting, and are hidden from the splitter, so that
    # neither an encoded comma nor a ":" or "@" inside one can cut or make an address.
    words: list[str] = []

    def hide(word: re.Match[str]) -> str:
        words.append(word.group(0))
        return f"\ue000{len(words) - 1}\ue001"

    def show(text: str) -> str:
        return _HIDDEN_WORD.sub(lambda hidden: words[int(hidden.group(1))], text)

    hidden = _ENCODED_WORD.sub(hide, value.replace("\ue000", "").replace("\ue001", ""))
    try:
        pairs = email.utils.getaddresses([hidden])
    except RecursionError:
        # email.utils recurses once a group, so "g:" a thousand times exhausts the stack.
        return []
    return [
        (clean_text(_decode_words(show(name)), multiline=False), show(addr))
        for name, addr in pairs
        if name or addr
    ]


def _clean_address(addr: str) -> str | None:
    """Return a clean addr-spec with its domain lowercased, or None if addr is not one."""
    addr = addr.strip()
    if len(addr) > 254 or not _ADDR_SPEC.fullmatch(addr):
        return None
    local, _, domain = addr.rpartition("@")
    return f"{local}@{domain.lower()}"


def _addresses(msg: EmailMessage, *names: str) -> list[tuple[str, str]]:
    """Return (display name, clean addr-spec) pairs from address headers, dropping the rest."""
    found: dict[str, str] = {}
    for value in (value for name in names for value in _raw_headers(msg, name)):
        for display_name, addr in _split_addresses(value):
            clean = _clean_address(addr)
            if clean is not None:
                found.setdefault(clean, display_name)
    return [(name, addr) for addr, name in found.items()]


def _sender(msg: EmailMessage) -> tuple[str, str, str | None]:
    """Return the From's display name and address, and what makes it doubtful, if anything."""
    values = _raw_headers(msg, "From")
    if not values:
        raise MalformedMail("no From header")
    pairs = [pair for value in values for pair in _split_addresses(value)]
    usable = [(name, clean) for name, addr in pairs if (clean := _clean_address(addr))]
    if not usable:
        raise MalformedMail("From header has no usable address")
    name, addr = usable[0]
    problem = None
    if len(usable) > 1:
        problem = "From has more than one address"
    elif len(pairs) > 1:
        problem = "From is not one clean address"
    elif any(other.lower() != addr.lower() for other in _ADDR_IN_TEXT.findall(name)):
        # Most clients show the display name alone, so an address there passes for the sender.
        problem = "From display name contains another address"
    return name, addr, problem


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
    """A leaf MIME part with the headers that parsing needs, decoded once."""

    parent: str  # The subtype of the enclosing multipart, "" for a single-part mail.
    part: EmailMessage
    content_type: str
    filename: str | None
    disposition: str | None


def _leaves(part: EmailMessage, parent: str = "") -> Iterator[_Leaf]:
    """Yield the leaf parts of a mail, treating attached messages as leaves."""
    # get_payload() is called on lists only: on text it decodes with the declared charset.
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        for sub in part.get_payload():
            if isinstance(sub, EmailMessage):
                yield from _leaves(sub, part.get_content_subtype())
    else:
        disposition = part.get_content_disposition()
        yield _Leaf(parent, part, part.get_content_type(), _filename(part), disposition)


def _filename(part: EmailMessage) -> str | None:
    """The part's filename (or Content-Type name), RFC 2231 decoded with a charset fit for mail."""
    value = part.get_param("filename", None, "content-disposition")
    if value is None:
        value = part.get_param("name", None)
    return None if value is None else rfc2231_text(value).strip()


def _is_body(leaf: _Leaf, content_type: str) -> bool:
    """Tell whether a part can be the mail body: the right type, unnamed and not an attachment."""
    # A multipart leaf lost its boundary: its raw text beats an empty ticket.
    broken = content_type == "text/plain" and leaf.content_type.startswith("multipart/")
    return (
        (leaf.content_type == content_type or broken)
        and leaf.disposition != "attachment"
        and leaf.filename is None
    )


def _part_text(part: EmailMessage, limit: int) -> tuple[str, bool]:
    """Decode a text part, "\\n" line endings, at most limit characters; and whether it was cut."""
    data = part.get_payload(decode=True)
    charset = part.get_param("charset")
    text = ""
    if isinstance(data, bytes):
        text = decode_text(data, rfc2231_text(charset) if charset else None)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text[:limit], len(text) > limit


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


def _body_text(part: EmailMessage, limit: int) -> tuple[str, bool]:
    """Return the readable text of a text/plain part, unwrapping format=flowed; and if cut."""
    text, cut = _part_text(part, limit)
    if str(part.get_param("format", "")).lower() == "flowed":
        text = _unflow(text, str(part.get_param("delsp", "")).lower() == "yes")
    return tidy_lines(text), cut


def _attachment(leaf: _Leaf, cids: set[str], spooled: dict[str, SpooledFile]) -> ParsedAttachment:
    """Build a ParsedAttachment from a non-body leaf part (its content spooled, if it was)."""
    part, name = leaf.part, leaf.filename
    spool = spooled.get(_first_header(part, SPOOL_FIELD).strip()) if spooled else None
    content_type = leaf.content_type
    if not _MIME_TYPE.fullmatch(content_type):
        content_type = "application/octet-stream"
    if name is not None and "=?" in name:
        # Outlook puts RFC 2047 encoded words inside quoted parameters, against RFC 2231.
        name = _decode_words(name)
    payload = part.get_payload()
    if isinstance(payload, list):
        # message/* parts carry parsed messages: write them back as .eml data with CRLF endings,
        # leaving the headers as they came so that signatures inside them still verify.
        inner = [m for m in payload if isinstance(m, EmailMessage)]
        as_sent = POLICY.clone(linesep="\r\n", refold_source="none")
        data = b"".join(m.as_bytes(policy=as_sent) for m in inner)
        if name is None and content_type == "message/rfc822" and inner:
            subject = clean_text(_decode_words(_first_header(inner[0], "Subject")), multiline=False)
            name = (subject or "message") + ".eml"
    elif spool is not None:
        data = b""
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
        spooled=spool,
    )


def read_mail_file(path: str | Path, limits: ParseLimits) -> bytes | SparseMail:
    """A mail's file as parse_mail takes it: sparse where there is a spool to decode into."""
    if limits.spool_dir is None:
        return Path(path).read_bytes()
    # Long runs of base64 lines stay in the file: the spool reads them from there.
    return read_sparse(path, limits.spool_part_bytes)


def parse_mail_file(path: str | Path, limits: ParseLimits | None = None) -> ParsedMail:
    """Parse a mail kept in a file, reading its large base64 attachments only into the spool."""
    limits = limits or ParseLimits()
    return parse_mail(read_mail_file(path, limits), limits)


def parse_mail(mail: bytes | SparseMail, limits: ParseLimits | None = None) -> ParsedMail:
    """Parse raw RFC 5322 bytes into a ParsedMail; raise MalformedMail if the mail is unusable.

    A `SparseMail` (large base64 runs left in its file) is parsed as its whole bytes would be.
    """
    limits = limits or ParseLimits()
    sparse = mail if isinstance(mail, SparseMail) else None
    if sparse is not None and (limits.spool_dir is None or has_bare_cr(sparse.kept)):
        # Making bare CRs CRLF would move the holes: such a mail is read whole.
        return parse_mail(Path(sparse.path).read_bytes(), limits)
    raw = sparse.kept if sparse is not None else mail
    assert isinstance(raw, bytes)
    if not raw or raw.isspace():  # Not strip(): that would copy a large mail.
        raise MalformedMail("empty input")
    spooled: dict[str, SpooledFile] = {}
    disk_faults: tuple[type[Exception], ...] = (OSError,) if sparse is not None else ()
    try:
        if sparse is not None:
            raw, leaves = scan_shape(raw, limits, size=sparse.size,
                                     hidden_lines=sparse.hidden_lines())  # fmt: skip
        else:
            raw, leaves = scan_shape(raw, limits)
        if limits.spool_dir is not None:
            raw, spooled = spool_large_parts(
                raw, leaves, Path(limits.spool_dir), limits.spool_part_bytes, sparse
            )
        parsed = _parse(raw, limits, spooled)
    except HoleOutside:
        # A long run of base64 lines in a part that is not spooled: the part needs them.
        assert sparse is not None
        return parse_mail(Path(sparse.path).read_bytes(), limits)
    except MalformedMail:
        discard(spooled.values())
        raise
    except disk_faults:
        # The mail's file failed while its holes were read: a fault of the disk, not the mail's.
        discard(spooled.values())
        raise
    except Exception as exc:  # The email package has no common base class for its failures.
        discard(spooled.values())
        detail = clean_text(str(exc), multiline=False)[:200]
        raise MalformedMail(f"cannot parse mail ({type(exc).__name__}: {detail})") from exc
    taken = {id(a.spooled) for a in parsed.attachments if a.spooled is not None}
    discard(f for f in spooled.values() if id(f) not in taken)
    return parsed


def _parse(raw: bytes, limits: ParseLimits, spooled: dict[str, SpooledFile]) -> ParsedMail:
    """Do the work of parse_mail, letting any exception escape."""
    msg = BytesParser(policy=POLICY).parsebytes(raw)
    if not isinstance(msg, EmailMessage) or not msg.keys():
        raise MalformedMail("no headers: not an email")
    from_name, from_address, from_problem = _sender(msg)
    leaves = list(_leaves(msg))
    plains = [leaf for leaf in leaves if _is_body(leaf, "text/plain")]
    body_parts = plains[:1]
    if plains and plains[0].parent == "mixed":
        # Apple Mail splits a plain body around inline attachments into sibling text/plain parts.
        body_parts = [leaf for leaf in plains if leaf.parent == "mixed"]
    html_leaf = next((leaf for leaf in leaves if _is_body(leaf, "text/html")), None)
    limit = limits.max_text_chars
    bodies = [_body_text(leaf.part, limit) for leaf in body_parts]
    text = "\n\n".join(filter(None, (body for body, _ in bodies)))
    truncated = any(cut for _, cut in bodies)
    html_source, html_cut = _part_text(html_leaf.part, limit) if html_leaf else (None, False)
    html = sanitise_html(html_source) if html_source is not None else None
    if not text and html:
        text, truncated = html_to_text(html, sanitised=True), html_cut
    text = clean_text(text, multiline=True)
    truncated = truncated or len(text) > limit  # Several parts may pass the limit together.
    if truncated:
        text = text[:limit].rstrip() + "\n\n" + TRUNCATION_MARKER.format(limit=limit)
    cids = {unquote(ref).lower() for ref in _CID_REF.findall(html_source or "")}
    body_ids = {id(leaf.part) for leaf in [*plains, html_leaf] if leaf is not None}
    attachments = [
        _attachment(leaf, cids, spooled)
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
        subject=clean_text(_decode_words(_first_header(msg, "Subject")), multiline=False),
        from_name=from_name,
        from_address=from_address,
        to=[addr for _, addr in _addresses(msg, "To")],
        cc=[addr for _, addr in _addresses(msg, "Cc")],
        delivered_to=[
            addr for _, addr in _addresses(msg, "Delivered-To", "X-Original-To", "Envelope-To")
        ],
        date=_date(_first_header(msg, "Date")),
        text=text,
        html=html,
        attachments=attachments,
        from_problem=from_problem,
        reply_to=[addr for _, addr in _addresses(msg, "Reply-To")],
        truncated=truncated or html_cut,
    )


def sanitise_filename(name: str | None, content_type: str) -> str:
    """Make an attachment name safe: no path, no control characters, at most 200, never empty."""
    # NFC, because Apple Mail sends decomposed accents. Controls and bidi marks go, so that
    # "invoice_\u202efdp.exe" cannot pass for a PDF, and so does every other format character.
    name = clean_text(unicodedata.normalize("NFC", name or ""), multiline=False)
    name = "".join("_" if c in '<>:"|?*' else c for c in name if unicodedata.category(c)[0] != "C")
    name = " ".join(re.split(r"[/\\]", name)[-1].split()).strip(" .")
    if len(name) > _MAX_FILENAME:
        stem, dot, extension = name.rpartition(".")
        if dot and stem and len(extension) <= 16:
            name = stem[: _MAX_FILENAME - len(extension) - 1].rstrip() + "." + extension
        else:
            name = name[:_MAX_FILENAME].rstrip()
    return name or "attachment" + (_MIME_TYPES.guess_extension(content_type) or "")
