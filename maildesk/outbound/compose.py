"""Compose stage: turn an Outbox row's draft into the MIME bytes that go on the wire.

The transaction that decides a notification stores what the mail says (a draft: its headers'
values, its text and HTML, the stored attachments it carries) and not its MIME form. Building
the MIME (header objects, quoted-printable, base64 of every attachment, the generator) cost
about as much as all the rest of filing, and on SQLite it was paid while holding the store's one
write lock; an agent's copy also embedded every attachment again in its row. The sender composes
each mail just before it leaves, outside any transaction; `outbox show` composes the same bytes.

The draft is JSON so that any instance, and any later version, reads it; `version` says which
shape it has.
"""

from __future__ import annotations

import base64
import email.policy
import json
import os
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from email.headerregistry import Address, BaseHeader, UnstructuredHeader
from email.message import EmailMessage
from email.policy import Policy
from pathlib import Path
from typing import Any, BinaryIO

from maildesk.mail.headers import CachedHeaderRegistry
from maildesk.rules.classify import LOOP_HEADER
from maildesk.store.files import ATTACHMENTS_DIR, SPOOL_DIR, content_path

DRAFT_VERSION = 1
# A stored file larger than this is streamed into the mail by write_mail, never read whole.
STREAM_BYTES = 256 * 1024
_BASE64_LINE_BYTES = 57


class _MessageIdListHeader(UnstructuredHeader, BaseHeader):
    """In-Reply-To and References: one msg-id per line, never turned into encoded words."""

    # The standard folder treats these headers as free text and encodes any msg-id longer than
    # a line (Outlook's often are) as an RFC 2047 word, which breaks threading; the ids are
    # validated ASCII tokens, so one per folded line is always correct.
    def fold(self, *, policy: Policy) -> str:
        """The header folded with one msg-id per line."""
        return f"{self.name}: " + f"{policy.linesep} ".join(str(self).split()) + policy.linesep


_HEADERS = CachedHeaderRegistry()
_HEADERS.map_to_type("in-reply-to", _MessageIdListHeader)
_HEADERS.map_to_type("references", _MessageIdListHeader)
POLICY = email.policy.SMTP.clone(header_factory=_HEADERS)


@dataclass(frozen=True)
class DraftFile:
    """A stored attachment that the mail carries, by its content address."""

    sha256: str
    content_type: str
    filename: str | None


@dataclass(frozen=True)
class Draft:
    """Everything an outgoing mail says, before it is put in MIME form."""

    message_id: str
    date: str
    sender: tuple[str, str]  # (display name, address)
    to: tuple[str, str]
    subject: str
    text: str
    html: str
    language: str
    loop: str  # The desk's domain, in the loop-detection header.
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    reply_to: tuple[str, str] | None = None
    auto: str | None = None
    files: tuple[DraftFile, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        """The draft as stored in Outbox.draft."""
        return json.dumps({"version": DRAFT_VERSION, **asdict(self)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Draft:
        """Read a stored draft; ValueError if it is not one this version knows."""
        try:
            data: dict[str, Any] = json.loads(text)
            if data.pop("version", None) != DRAFT_VERSION:
                raise ValueError("unknown draft version")
            data["sender"], data["to"] = tuple(data["sender"]), tuple(data["to"])
            if data.get("reply_to") is not None:
                data["reply_to"] = tuple(data["reply_to"])
            data["references"] = tuple(data.get("references") or ())
            data["files"] = tuple(DraftFile(**f) for f in data.get("files") or ())
            return cls(**data)
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a draft: {exc}") from None


def _address(pair: tuple[str, str]) -> Address:
    return Address(pair[0], addr_spec=pair[1])


def build(draft: Draft, read_file: Callable[[DraftFile], bytes | None]) -> bytes:
    """The draft in MIME form, with `read_file`'s bytes for each file (None: left out)."""
    return _message(draft, [(item, read_file(item)) for item in draft.files]).as_bytes(
        policy=POLICY
    )


def _message(draft: Draft, contents: list[tuple[DraftFile, bytes | None]]) -> EmailMessage:
    """The draft as an EmailMessage, each file with its content (None: left out)."""
    msg = EmailMessage(policy=POLICY)
    msg["Message-ID"] = draft.message_id
    msg["Date"] = draft.date
    msg["From"] = _address(draft.sender)
    msg["To"] = _address(draft.to)
    msg["Subject"] = draft.subject
    if draft.in_reply_to:
        msg["In-Reply-To"] = draft.in_reply_to
    if draft.references:
        msg["References"] = " ".join(draft.references)
    if draft.reply_to is not None:
        msg["Reply-To"] = _address(draft.reply_to)
    msg[LOOP_HEADER] = draft.loop
    if draft.auto is not None:
        msg["Auto-Submitted"] = draft.auto
        msg["X-Auto-Response-Suppress"] = "All"
    # Quoted-printable keeps the body 7-bit, so any relay takes it, and stays readable.
    msg.set_content(draft.text, subtype="plain", charset="utf-8", cte="quoted-printable")
    msg.add_alternative(draft.html, subtype="html", charset="utf-8", cte="quoted-printable")
    for item, data in contents:
        if data is None:
            continue  # Erased under the retention rules since; the text still names it.
        maintype, _, subtype = item.content_type.partition("/")
        if not maintype or not subtype:
            maintype, subtype = "application", "octet-stream"
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=item.filename)
    # Set last: set_content() and add_alternative() move or drop Content-* headers.
    msg["Content-Language"] = draft.language
    return msg


def streams(draft: Draft, state_dir: Path) -> bool:
    """Whether the draft carries a stored file large enough to be streamed by `write_mail`."""
    for item in draft.files:
        try:
            if content_path(state_dir, ATTACHMENTS_DIR, item.sha256).stat().st_size > STREAM_BYTES:
                return True
        except FileNotFoundError:
            continue
    return False


def write_mail(draft: Draft, state_dir: Path, out: BinaryIO) -> None:
    """Write the draft in MIME form, the same bytes as build(), streaming its large files.

    The EmailMessage holds a short random stand-in for each large file, whose base64 line is
    replaced, as the bytes are written, by the file's base64 read a piece at a time: the
    headers are still the email package's, and no file is ever in memory whole.
    """
    contents: list[tuple[DraftFile, bytes | None]] = []
    streamed: dict[bytes, Path] = {}
    for item in draft.files:
        path = content_path(state_dir, ATTACHMENTS_DIR, item.sha256)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            contents.append((item, None))
            continue
        if size > STREAM_BYTES:
            stand_in = secrets.token_bytes(30)  # 40 characters of base64: one line, no padding.
            streamed[base64.b64encode(stand_in) + POLICY.linesep.encode()] = path
            contents.append((item, stand_in))
        else:
            contents.append((item, path.read_bytes()))
    skeleton = _message(draft, contents).as_bytes(policy=POLICY)
    done = 0
    for line, path in streamed.items():
        at = skeleton.index(line, done)
        out.write(skeleton[done:at])
        _write_base64(path, out)
        done = at + len(line)
    out.write(skeleton[done:])


def _write_base64(path: Path, out: BinaryIO) -> None:
    """A file's content in base64 lines, as the email package encodes an attachment."""
    # 57 bytes make one line of 76 characters, as email.contentmanager cuts them under
    # policy.SMTP's 78-character lines, and as base64.encodebytes does.
    piece = _BASE64_LINE_BYTES * 2 * 1024
    linesep = POLICY.linesep.encode()
    with open(path, "rb") as source:
        while data := source.read(piece):
            out.write(base64.encodebytes(data).replace(b"\n", linesep))


def stored_files(state_dir: Path) -> Callable[[DraftFile], bytes | None]:
    """A `read_file` for build() that reads the attachments stored under `state_dir`."""

    def read(item: DraftFile) -> bytes | None:
        try:
            return content_path(state_dir, ATTACHMENTS_DIR, item.sha256).read_bytes()
        except FileNotFoundError:
            return None

    return read


def outgoing_mail(raw: bytes, draft: str | None, state_dir: Path) -> bytes | Path:
    """An Outbox row's mail as the sender sends it: its bytes, or, for a draft carrying a large
    file, a spool file of state_dir holding them (the sender removes it once sent)."""
    if draft is None:
        return raw  # Rows queued before drafts (schema 0007 and older) hold their MIME form.
    return compose(Draft.from_json(draft), state_dir)


def compose(draft: Draft, state_dir: Path) -> bytes | Path:
    """A draft in MIME form: its bytes, or a spool file holding them if it carries a large file."""
    if streams(draft, state_dir):
        return spool_mail(draft, state_dir)
    return build(draft, stored_files(state_dir))


def spool_mail(draft: Draft, state_dir: Path) -> Path:
    """Write the draft's mail into a new file of the spool (see write_mail); its path."""
    (state_dir / SPOOL_DIR).mkdir(exist_ok=True)
    fd, name = tempfile.mkstemp(dir=state_dir / SPOOL_DIR, prefix="out-")
    try:
        with os.fdopen(fd, "wb") as out:
            write_mail(draft, state_dir, out)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def outgoing_bytes(raw: bytes, draft: str | None, state_dir: Path) -> bytes:
    """An Outbox row's mail as it leaves: its stored bytes, or its draft composed now."""
    if draft is None:
        return raw  # Rows queued before drafts (schema 0007 and older) hold their MIME form.
    return build(Draft.from_json(draft), stored_files(state_dir))
