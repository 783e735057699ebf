"""Bounds on a mail's size and shape, checked on its bytes before the email package sees them.

The email package is slow on hostile input: its feed parser spends about a microsecond on every
line and far more on every part, and the header parsers of policy.default are recursive and
quadratic (a 64 KiB Content-Transfer-Encoding of comments takes 18 s, a From of dots 74 s). So
`scan_shape` refuses, in linear scans of the bytes, any mail that breaks a bound of
`ParseLimits`, with a reason naming the bound; and `POLICY` reads the MIME headers that every
part is asked about with the cheap string code of compat32 instead of those parsers.
"""

from __future__ import annotations

import codecs
import email.message
import email.policy
import re
from dataclasses import dataclass
from email.errors import MessageDefect
from email.headerregistry import BaseHeader
from email.policy import Policy
from itertools import accumulate
from operator import sub
from types import MappingProxyType
from typing import ClassVar, Literal, NamedTuple, Self

from maildesk.mail.headers import CachedHeaderRegistry
from maildesk.mail.message import MalformedMail


@dataclass(frozen=True)
class ParseLimits:
    """What one mail may be; the defaults match config's [limits]."""

    max_mail_bytes: int = 25 * 1024 * 1024
    max_lines: int = 1_000_000  # The feed parser's cost grows with lines: 1 µs each.
    max_parts: int = 500  # MIME entities: parts, attached messages, delivery-status blocks.
    max_depth: int = 20  # Nested multiparts and attached messages.
    max_header_bytes: int = 256 * 1024  # One header section: the mail's, or one part's.
    max_field_bytes: int = 16 * 1024  # One header field as sent, folding included.
    max_params: int = 64  # Parameters of one Content-Type or Content-Disposition.
    max_comment_depth: int = 50  # Nested parentheses in one header field.
    max_text_chars: int = 2_000_000  # Decoded text kept (longer text is cut, with a marker).
    # Where base64 attachments of spool_part_bytes or more are decoded to, instead of into
    # memory (mail/spool.py); None keeps every part in memory.
    spool_dir: str | None = None
    spool_part_bytes: int = 256 * 1024


TRUNCATION_MARKER = "[maildesk: the rest of this text was cut, it was over {limit} characters]"

# Codecs that Python knows but that no mail may name: escapes that make any character out of
# ASCII (so controls and lone surrogates), labels for domain names (their pure-Python decoder
# takes quadratic time), and UTF-7, which the HTML standard forbids browsers to support
# because its ASCII bytes can hide markup from any filter that reads them.
_DENIED_CODECS = frozenset(
    {"punycode", "idna", "raw-unicode-escape", "unicode-escape", "utf-7", "undefined", "mbcs",
     "oem", "charmap"}
)
_CHARSET_NAME = re.compile(r"[A-Za-z0-9_.:+-]{1,40}")


def mail_codec(charset: str | None) -> str | None:
    """The codec to decode a declared charset with, or None when it is unknown or not for mail."""
    name = (charset or "").strip().strip('"').strip()
    if not _CHARSET_NAME.fullmatch(name):
        return None
    try:
        info = codecs.lookup(name)
    except LookupError:
        return None
    # Bytes-to-bytes codecs (base64_codec, zlib, hex, uu, quopri) and rot13 are not text.
    if not getattr(info, "_is_text_encoding", True) or info.name in _DENIED_CODECS:
        return None
    # Like browsers, read Latin-1 as its Windows-1252 superset: mailers label € and curly
    # quotes that way.
    return "cp1252" if info.name == "iso8859-1" else info.name


def decode_text(data: bytes, charset: str | None) -> str:
    """Decode with the declared charset if it is fit for mail, else UTF-8, else Windows-1252."""
    for name in (mail_codec(charset), "utf-8"):
        if name is not None:
            try:
                return data.decode(name)
            except ValueError:  # UnicodeDecodeError, and the codecs that raise plain ValueError.
                continue
    return data.decode("cp1252", errors="replace")


_SURROGATES = re.compile(r"[\udc80-\udcff]")


def fix_8bit(value: str) -> str:
    """Decode the raw 8-bit bytes that the email package keeps as surrogate escapes."""
    if _SURROGATES.search(value):
        return decode_text(value.encode("utf-8", "surrogateescape"), None)
    return value


class _MIMEHeader(BaseHeader):
    """A MIME header kept as its text, which email.message's compat32 string code reads."""

    max_count: ClassVar[Literal[1] | None] = 1
    _name: str
    _defects: list[MessageDefect]

    def __new__(cls, name: str, value: str) -> Self:
        # email.utils decodes an RFC 2231 value (boundary, charset, filename) with the codec it
        # names: one not fit for mail is read as UTF-8 instead, as decode_text would.
        self = str.__new__(cls, _EXTENDED_CHARSET.sub(_fit_charset, fix_8bit(value)))
        self._name = name
        self._defects = []  # None are looked for: that is the parser this class avoids.
        return self

    def fold(self, *, policy: Policy) -> str:
        """Fold like compat32, with the line separator of the policy asked for."""
        return email.policy.compat32.clone(linesep=policy.linesep).fold(self.name, str(self))

    @property
    def params(self) -> MappingProxyType[str, str]:
        """The parameters, RFC 2231 values decoded through `decode_text`."""
        compat = email.message.Message()
        compat.set_raw(self.name, str(self))
        found: dict[str, str] = {}
        for key, value in (compat.get_params(header=self.name) or [])[1:]:
            found[key.lower()] = rfc2231_text(value)
        return MappingProxyType(found)

    def _token(self) -> str:
        return self.partition(";")[0].strip().lower()


class _ContentType(_MIMEHeader):
    @property
    def content_type(self) -> str:
        """maintype/subtype as compat32 reads it, text/plain when that is not one type."""
        token = self._token()
        return token if token.count("/") == 1 else "text/plain"

    @property
    def maintype(self) -> str:
        """The part before the slash."""
        return self.content_type.partition("/")[0]

    @property
    def subtype(self) -> str:
        """The part after the slash."""
        return self.content_type.partition("/")[2]


class _ContentDisposition(_MIMEHeader):
    @property
    def content_disposition(self) -> str | None:
        """"inline", "attachment" or whatever token came, lowercased."""
        return self._token() or None


class _ContentTransferEncoding(_MIMEHeader):
    @property
    def cte(self) -> str:
        """The encoding, lowercased."""
        return self.strip().lower()


# The charset of an RFC 2231 value: name*=charset'language'text, or name*0*=charset'...
_EXTENDED_CHARSET = re.compile(r"""(;\s*[^\s;=*]+\*(?:0\*)?\s*=\s*"?)([^'";\s]*)(')""")


def _fit_charset(found: re.Match[str]) -> str:
    charset = found.group(2)
    return found.group(1) + ("utf-8" if _unfit(charset) else charset) + found.group(3)


def _unfit(charset: str) -> bool:
    """Whether a charset names a codec that Python has but that mail may not use."""
    if mail_codec(charset) is not None:
        return False
    try:
        codecs.lookup(charset)
    except LookupError:
        return False
    return True


def rfc2231_text(value: str | tuple[str | None, str | None, str]) -> str:
    """A parameter value from email.message: RFC 2231 ones decoded with a charset fit for mail."""
    if not isinstance(value, tuple):
        return value
    charset, _language, text = value
    try:
        data = text.encode("latin-1")  # email.utils keeps the %-decoded octets as Latin-1.
    except UnicodeEncodeError:
        data = text.encode("utf-8", "surrogateescape")
    return decode_text(data, charset)


_REGISTRY = CachedHeaderRegistry()
_REGISTRY.map_to_type("content-type", _ContentType)
_REGISTRY.map_to_type("content-disposition", _ContentDisposition)
_REGISTRY.map_to_type("content-transfer-encoding", _ContentTransferEncoding)
# policy.default, except that the three MIME headers that the parser, the generator and this
# package ask every part about are read with compat32's string code, which is linear.
POLICY = email.policy.default.clone(header_factory=_REGISTRY)


# A header section is the run of lines that the feed parser's headerRE accepts.
_HEADER_START = rb"(?:From |[\x21-\x39\x3b-\x7e]*:|[ \t])"
_HEADER_SECTION = re.compile(rb"(?:" + _HEADER_START + rb"[^\n]*(?:\n|\Z))*")
_HEADER_LINE = re.compile(_HEADER_START)
_BLANK_LINE = re.compile(rb"\r?\n")
_BLANK_LINES = re.compile(rb"^\r?\n", re.M)
_FIELD_BREAK = re.compile(rb"\n(?![ \t])")
_CONTENT_TYPE = re.compile(rb"^content-type:([^\n]*(?:\n[ \t][^\n]*)*)", re.I | re.M)
_MIME_FIELD = re.compile(
    rb"^(content-(?:type|disposition)):([^\n]*(?:\n[ \t][^\n]*)*)", re.I | re.M
)
_BARE_CR = re.compile(rb"\r(?!\n)")
_NOT_PARENS = bytes(c for c in range(256) if c not in b"()")


class LeafSpan(NamedTuple):
    """Where a leaf part nested in a multipart sits in the raw mail, as the feed parser sees it."""

    start: int  # Its header section.
    body: int  # Its body, after the blank line.
    end: int  # The line break before the next delimiter line (or the end of the mail).
    content_type: str


class Shape(NamedTuple):
    """A mail that passed `scan_shape`: its bytes, and the spans of its nested leaf parts."""

    raw: bytes
    leaves: list[LeafSpan]


class _Multipart(NamedTuple):
    """An open multipart while scanning: its delimiter and where its parts sit."""

    delimiter: bytes
    depth: int
    digest: bool


def scan_shape(
    raw: bytes, limits: ParseLimits, *, size: int | None = None, hidden_lines: int = 0
) -> Shape:
    """Refuse a mail that breaks a bound; return it (bare CRs made CRLF) and its leaf parts.

    `size` and `hidden_lines` count what a sparse mail (see sparse.py) left out of `raw`.
    """
    size = len(raw) if size is None else size
    if size > limits.max_mail_bytes:
        raise MalformedMail(f"too large ({size} bytes, the limit is {limits.max_mail_bytes})")
    # The feed parser ends lines at a bare CR too: making them CRLF lets the scans below see
    # the lines that it will see.
    if has_bare_cr(raw):
        raw = _BARE_CR.sub(b"\r\n", raw)
    if raw.count(b"\n") + hidden_lines > limits.max_lines:
        raise MalformedMail(f"too many lines (over {limits.max_lines})")
    scan = _Scan(raw, limits)
    scan.run()
    return Shape(raw, scan.leaves)


def has_bare_cr(raw: bytes) -> bool:
    """Whether a CR in the bytes is not followed by LF."""
    return raw.count(b"\r") != raw.count(b"\r\n")


class _Scan:
    """One pass over a mail's MIME structure, as the feed parser will walk it."""

    def __init__(self, raw: bytes, limits: ParseLimits) -> None:
        self.raw = raw
        self.limits = limits
        self.open: list[_Multipart] = []
        self.delimiters: re.Pattern[bytes] | None = None
        self.parts = 1
        self.leaves: list[LeafSpan] = []
        self.part_end = len(raw)  # Where the last part that _next_part left ends.

    def run(self) -> None:
        """Walk the entities from the top, refusing the mail at the first bound it breaks."""
        pos, depth, default = 0, 0, "text/plain"
        while True:
            start, nested = pos, self.delimiters is not None
            content_type, boundary, pos = self._header_section(pos, default)
            leaf = False
            if content_type == "message/delivery-status":
                self._deeper(depth)  # Its blocks are parts one level down, and end there.
                pos = self._status_blocks(pos)
            elif content_type.startswith("message/"):
                # The body is a whole message, starting with its own header section.
                depth = self._deeper(depth)
                self._count_part()
                default = "text/plain"
                continue
            elif content_type.startswith("multipart/") and boundary is not None:
                depth = self._deeper(depth)
                digest = content_type == "multipart/digest"
                self.open.append(_Multipart(b"--" + boundary, depth, digest))
                self._compile()
            else:
                leaf = nested
            next_part = self._next_part(pos)
            if leaf:
                self.leaves.append(LeafSpan(start, pos, max(pos, self.part_end), content_type))
            if next_part is None:
                return
            pos, depth, default = next_part

    def _deeper(self, depth: int) -> int:
        if depth + 1 > self.limits.max_depth:
            raise MalformedMail(f"nested too deep (over {self.limits.max_depth} levels)")
        return depth + 1

    def _count_part(self, count: int = 1) -> None:
        self.parts += count
        if self.parts > self.limits.max_parts:
            raise MalformedMail(f"too many MIME parts (over {self.limits.max_parts})")

    def _compile(self) -> None:
        """Match a line that ends the current part: a delimiter of any open multipart."""
        if not self.open:
            self.delimiters = None
            return
        # The feed parser asks the enclosing multiparts first whether a line ends the part, so
        # a line that is a delimiter of several belongs to the outermost: try that one first.
        alternatives = b"|".join(
            b"(?P<m%d>%s)" % (index, re.escape(multipart.delimiter))
            for index, multipart in enumerate(self.open)
        )
        self.delimiters = re.compile(
            rb"^(?:" + alternatives + rb")(?P<close>--)?[ \t]*\r?$", re.M
        )

    def _which(self, found: re.Match[bytes]) -> int:
        return next(i for i in range(len(self.open)) if found.group(f"m{i}") is not None)

    def _next_part(self, pos: int) -> tuple[int, int, str] | None:
        """Find the next part that starts after pos: (its start, its depth, its default type)."""
        self.part_end = len(self.raw)
        first = True
        while self.delimiters is not None:
            found = self.delimiters.search(self.raw, pos)
            if found is None:
                return None
            if first:
                # The line break before a delimiter line belongs to the delimiter (RFC 2046).
                end = found.start()
                if end > pos and self.raw[end - 1] == 10:
                    end -= 2 if end - 1 > pos and self.raw[end - 2] == 13 else 1
                self.part_end, first = end, False
            index = self._which(found)
            del self.open[index + 1 :]
            pos = _line_end(self.raw, found.end())
            if found.group("close"):
                self.open.pop()
                self._compile()
                continue
            self._compile()
            # Delimiter lines of the same multipart that follow are skipped, closing ones too.
            while (again := self.delimiters.match(self.raw, pos)) and self._which(again) == index:
                pos = _line_end(self.raw, again.end())
            self._count_part()
            multipart = self.open[index]
            return pos, multipart.depth, "message/rfc822" if multipart.digest else "text/plain"
        return None

    def _header_section(self, pos: int, default: str) -> tuple[str, bytes | None, int]:
        """Check the header section at pos; return its type, boundary and where its body starts."""
        limit = self.limits.max_header_bytes
        matched = _HEADER_SECTION.match(self.raw, pos, pos + limit + 1)
        end = matched.end() if matched else pos
        if end - pos > limit or (end < len(self.raw) and _HEADER_LINE.match(self.raw, end)):
            raise MalformedMail(f"header section too large (over {limit} bytes)")
        body = end
        ending = self.delimiters.search(self.raw, pos, end) if self.delimiters else None
        if ending is not None:
            # A delimiter line ends the headers, whatever it looks like.
            end = body = ending.start()
        elif blank := _BLANK_LINE.match(self.raw, end):
            body = blank.end()
        section = self.raw[pos:end]
        self._check_fields(section)
        found = _CONTENT_TYPE.search(section)
        probe = email.message.EmailMessage(policy=POLICY)
        probe.set_default_type(default)
        if found is not None:
            value = re.sub(rb"[\r\n]", b"", found.group(1)).lstrip(b" \t")
            probe.set_raw("Content-Type", value.decode("ascii", "surrogateescape"))
        boundary = probe.get_boundary()
        try:
            delimiter = None if boundary is None else boundary.encode("ascii", "surrogateescape")
        except UnicodeEncodeError:
            delimiter = None  # Decoded from 8-bit bytes, it can match no line.
        return probe.get_content_type(), delimiter, body

    def _status_blocks(self, pos: int) -> int:
        """Check a message/delivery-status body, whose blank-line blocks are header sections."""
        ending = self.delimiters.search(self.raw, pos) if self.delimiters else None
        end = len(self.raw) if ending is None else ending.start()
        body = self.raw[pos:end]
        limit = self.limits.max_header_bytes
        if len(body) > limit:
            raise MalformedMail(f"header section too large (over {limit} bytes)")
        self._check_fields(body)
        # The feed parser would parse each block as a message of its own, nesting without end.
        if _CONTENT_TYPE.search(body):
            raise MalformedMail("Content-Type field inside message/delivery-status")
        self._count_part(len(_BLANK_LINES.findall(body)) + 1)
        return end

    def _check_fields(self, section: bytes) -> None:
        """Bound the fields of one header section: length, comment nesting, parameters."""
        limits = self.limits
        if len(section) > limits.max_field_bytes or section.count(b"(") > limits.max_comment_depth:
            fields = _FIELD_BREAK.split(section)
            if max(map(len, fields)) > limits.max_field_bytes:
                raise MalformedMail(f"header field too large (over {limits.max_field_bytes} bytes)")
            deep = limits.max_comment_depth
            for field in fields:
                if field.count(b"(") > deep and _comment_depth(field) > deep:
                    raise MalformedMail(f"comments nested too deep (over {deep} levels)")
        for found in _MIME_FIELD.finditer(section):
            name = "Content-Type" if found.group(1).lower() == b"content-type" else (
                "Content-Disposition"
            )
            value = found.group(2)
            if value.count(b";") > limits.max_params:
                raise MalformedMail(f"too many parameters in {name} (over {limits.max_params})")


def _comment_depth(field: bytes) -> int:
    """The deepest nesting of parentheses in a field, an unmatched ")" counting for nothing."""
    parens = field.translate(None, _NOT_PARENS)
    sums = list(accumulate((1 if c == 40 else -1 for c in parens), initial=0))
    return max(map(sub, sums, accumulate(sums, min)))


def _line_end(raw: bytes, pos: int) -> int:
    """The start of the line after the one that ends at pos."""
    newline = raw.find(b"\n", pos)
    return len(raw) if newline < 0 else newline + 1
