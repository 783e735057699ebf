"""Text and HTML in mail: safe text, readable text for HTML-only mail, and sanitised HTML.

The HTML functions guard against hostile markup: Python's HTML parser and nh3 take quadratic
time or worse on some deeply nested or malformed input, so such input is flattened before either
sees it; and the text extractor takes about twelve microseconds a tag, so absurd numbers of tags
are flattened too.
"""

from __future__ import annotations

import re
from collections import Counter
from html.parser import HTMLParser

import nh3

# Controls (C0 but tab and line feed, DEL, C1) and the bidirectional formatting characters,
# which can make "invoice_\u202efdp.exe" display as "invoice_exe.pdf"; lone surrogates too,
# which no encoder accepts.
_INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_BREAKS = re.compile("[\t\n\x0b\x0c\r]")


def clean_text(value: str, *, multiline: bool) -> str:
    """Remove controls and bidi marks; keep only "\\n" and "\\t" if multiline, else one line."""
    if not multiline:
        # Line breaks and tabs become spaces, so that "A\r\nBcc:" does not read "ABcc:".
        value = " ".join(_INVISIBLE.sub("", _BREAKS.sub(" ", value)).split())
    else:
        value = _INVISIBLE.sub("", value)
    return _SURROGATE.sub("\ufffd", value)


def tidy_lines(text: str) -> str:
    """Strip trailing whitespace on every line and blank lines at both ends."""
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


_PARAGRAPH_TAGS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6"})
_BLOCK_TAGS = frozenset(
    "address article aside blockquote center dd div dl dt figcaption figure footer form header hr"
    " li main nav ol pre section table tr ul".split()
)


class _TextExtractor(HTMLParser):
    """Collect the readable text of sanitised HTML, with blockquotes rendered as "> " lines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        # Newlines ending the output, so that nested blocks do not stack blank lines.
        self._newlines = 0
        self._pre = 0
        self._quote = 0
        self._lists: list[int] = []  # Next item number for <ol>, -1 for <ul>.
        self._link: tuple[str, list[str]] | None = None  # The open link's href and text.

    def _break(self, count: int) -> None:
        """End the current line so that count newlines end the output."""
        if self.chunks and self._newlines < count:
            self.chunks.append("\n" * (count - self._newlines))
            self._newlines = count

    def _write(self, text: str, raw: bool = False) -> None:
        """Append text, dropping whitespace at line starts and prefixing quoted lines."""
        if not self.chunks or self._newlines:
            text = text if raw else text.lstrip()
            if text and self._quote:
                # Capped, so that thousands of nested quotes cannot blow up the output.
                self.chunks.append(">" * min(self._quote, 10) + " ")
        elif not raw and text.startswith(" ") and self.chunks[-1].endswith(" "):
            text = text[1:]
        if text:
            self.chunks.append(text)
            stripped = text.rstrip("\n")
            self._newlines = len(text) - len(stripped) + (self._newlines if not stripped else 0)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br":
            self.chunks.append("\n")
            self._newlines += 1
        elif tag in ("td", "th") and not self._newlines:
            self._write(" ")
        self._break(2 if tag in _PARAGRAPH_TAGS else 1 if tag in _BLOCK_TAGS else 0)
        if tag == "blockquote":
            self._quote += 1
        elif tag == "pre":
            self._pre += 1
        elif tag in ("ul", "ol"):
            self._lists.append(1 if tag == "ol" else -1)
        elif tag == "li":
            number = self._lists[-1] if self._lists else -1
            self._write(f"{number}. " if number > 0 else "- ")
            if number > 0:
                self._lists[-1] += 1
        elif tag == "a":
            self.handle_endtag("a")  # Links do not nest: a new one closes the last, as in browsers.
            self._link = (dict(attrs).get("href") or "", [])

    def handle_endtag(self, tag: str) -> None:
        self._break(2 if tag in _PARAGRAPH_TAGS else 1 if tag in _BLOCK_TAGS else 0)
        if tag == "blockquote":
            self._quote = max(0, self._quote - 1)
        elif tag == "pre":
            self._pre = max(0, self._pre - 1)
        elif tag in ("ul", "ol") and self._lists:
            self._lists.pop()
        elif tag == "a" and self._link:
            (href, parts), self._link = self._link, None
            label = " ".join("".join(parts).split())
            target = href.strip()
            if label and target.lower().startswith(("http://", "https://", "mailto:")):
                target = target[7:] if target.lower().startswith("mailto:") else target
                if _bare_url(target) != _bare_url(label):
                    self._write(f" ({target})")

    def handle_data(self, data: str) -> None:
        self._write(data, raw=True) if self._pre else self._write(re.sub(r"\s+", " ", data))
        if self._link:
            self._link[1].append(data)


def _bare_url(url: str) -> str:
    """Reduce a URL to compare it with a link's text: no scheme, no trailing slash, lowercase."""
    return re.sub(r"^[a-z]+://", "", url.strip(), flags=re.I).rstrip("/").lower()


def html_to_text(html: str, *, sanitised: bool = False) -> str:
    """Convert HTML to readable plain text with line breaks, list bullets and "text (url)" links."""
    # Sanitising first drops scripts, styles and the head, and gives html.parser well-formed
    # input: on some malformed HTML it takes quadratic time (CVE-2025-6069, CPython gh-135462).
    extractor = _TextExtractor()
    extractor.feed(html if sanitised else sanitise_html(html))
    extractor.close()
    text = "".join(extractor.chunks).replace("\xa0", " ")
    return re.sub(r"\n{3,}", "\n\n", tidy_lines(text))


def _filter_attribute(tag: str, attribute: str, value: str) -> str | None:
    """Allow images only from the mail itself (cid: or raster data:), and no data:/cid: links."""
    lowered = value.strip().lower()
    if tag == "img" and attribute == "src":
        allowed = ("cid:", "data:image/png", "data:image/jpeg", "data:image/gif", "data:image/webp")
        return value if lowered.startswith(allowed) else None
    if attribute == "href" and lowered.startswith(("data:", "cid:")):
        return None
    return value


_CLEANER = nh3.Cleaner(
    tags=nh3.ALLOWED_TAGS - {"map", "area"},
    clean_content_tags={"script", "style", "title", "noscript", "template"},
    attributes={
        **nh3.ALLOWED_ATTRIBUTES,
        "*": {"style", "dir", "lang", "title"},
        "table": nh3.ALLOWED_ATTRIBUTES["table"]
        | {"border", "cellpadding", "cellspacing", "width"},
        "td": nh3.ALLOWED_ATTRIBUTES["td"] | {"width", "valign"},
        "th": nh3.ALLOWED_ATTRIBUTES["th"] | {"width", "valign"},
    },
    attribute_filter=_filter_attribute,
    url_schemes={"http", "https", "mailto", "tel", "cid", "data"},
    # Relative URLs would resolve against the desk's own origin.
    url_relative="deny",
    # Only properties that cannot load anything: no background, no list-style-image, no url().
    filter_style_properties=set(
        "color background-color font-weight font-style font-size font-family text-align"
        " text-decoration vertical-align white-space border border-left border-collapse margin"
        " margin-left padding padding-left width".split()
    ),
)


_TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9]*)")
# Elements that do not stay open: void ones, and those that the HTML parser closes by itself.
_UNNESTED_TAGS = frozenset(
    "area base br col embed hr img input link meta source track wbr p li dt dd tr td th".split()
)
_MAX_DEPTH = 512  # Go's html parser settled on the same limit for the same reason.
# html.parser and the extractor take 12 µs a tag: 50,000 tags cost 0.6 s, and a 2 MB mail of
# "a<br>" has 400,000 (5.5 s). Real mail has a few thousand.
_MAX_TAGS = 50_000
# html5ever (under nh3) takes time quadratic in the ampersands of one text node: 2 MB of
# "&amp;" in a paragraph takes 3.5 s. An empty comment, which the sanitiser drops, splits such a
# run into text nodes without changing the output; it goes before an "&", never inside a
# character reference. Only long runs are split: in the rare run that is not text (an attribute
# value holding ">", a <textarea>) the comment would show.
_AMPERSAND_RUN = re.compile(r"(?:^|(?<=>))(?:[^<&]*&){64}[^<]*")
_AMPERSANDS_PER_NODE = 64
_SPLIT_RUN_CHARS = 4096


def _split_ampersands(run: re.Match[str]) -> str:
    if len(run.group(0)) < _SPLIT_RUN_CHARS:
        return run.group(0)
    pieces = run.group(0).split("&")
    step = _AMPERSANDS_PER_NODE
    return "<!---->&".join("&".join(pieces[i : i + step]) for i in range(0, len(pieces), step))


def sanitise_html(html: str) -> str:
    """Sanitise mail HTML: no scripts, handlers or remote loads; keep formatting, tables, links."""
    # html5ever takes quadratic time on deep nesting, which no real mail has: count the elements
    # left open (an end tag only closes its own kind) and flatten absurd input to text.
    still_open: Counter[str] = Counter()
    depth = 0
    tags = _TAG.findall(html)
    for closing, tag in tags if len(tags) <= _MAX_TAGS else ():
        tag = tag.lower()
        if tag in _UNNESTED_TAGS or (closing and not still_open[tag]):
            continue
        step = -1 if closing else 1
        still_open[tag] += step
        depth += step
        if depth > _MAX_DEPTH:
            break
    if depth > _MAX_DEPTH or len(tags) > _MAX_TAGS:
        html = re.sub(r"</?[a-zA-Z][^<>]*>?", " ", html)
    return _CLEANER.clean(_AMPERSAND_RUN.sub(_split_ampersands, html)).strip()
