"""The types that every part of the house shares: where a mail came from, what became of it.

Ingress hands a raw mail and its `Delivery` to a `Handler`, which returns an `Outcome` once the
mail is durable, or raises `StoreUnavailable` so that the sender tries again later. Parse turns
the raw bytes into a `ParsedMail`, which the rules decide over. Nothing here touches a
database, the network or a template.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from typing import Protocol


class MalformedMail(Exception):
    """A mail that cannot be parsed; .reason is a short human-readable reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StoreUnavailable(Exception):
    """The database could not take the mail; the sender should try again later."""


# The source of mails that `maildesk import` files: past mail, which notifies nobody.
IMPORT_SOURCE = "import"


@dataclass(frozen=True)
class Delivery:
    """Where a raw mail came from."""

    source: str  # "imap", "smtp", "lmtp" or IMPORT_SOURCE
    mailbox: str | None = None
    uidvalidity: int | None = None
    uid: int | None = None
    envelope_from: str | None = None
    recipients: tuple[str, ...] = ()
    # Set by IMAP for a mail over the size limit: its declared size. Only its header section
    # was downloaded, and the pipeline quarantines it without parsing a body.
    oversize: int | None = None


@dataclass(frozen=True)
class Outcome:
    """What became of a mail once it was committed."""

    inbound_id: int
    # "ticket" (a new ticket), "followup" (a customer added to a ticket), "answer" (an agent
    # answered), "quarantined" (held with a reason), "ignored" (an automatic mail, stored and
    # not answered) or "duplicate" (already stored earlier; nothing new was done).
    outcome: str
    ticket_id: int | None = None
    reason: str | None = None

    @property
    def quarantined(self) -> bool:
        """Whether the mail was held rather than filed."""
        return self.outcome == "quarantined"


Handler = Callable[[bytes, Delivery], Outcome]


class Stored(Protocol):
    """What intake says of a mail once it is durable: the row that now holds it."""

    @property
    def inbound_id(self) -> int:
        """The stored mail's id."""


# The daemon's intake: a coroutine that returns once the mail is durable.
AsyncHandler = Callable[[bytes, Delivery], Awaitable[Stored]]


@dataclass(frozen=True)
class SpooledFile:
    """A large attachment that parsing decoded straight into a file instead of into memory."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ParsedAttachment:
    """A non-body MIME part: a real attachment or an inline image.

    Its content is `data`, or, for a large part that the parse spooled, the file `spooled`
    (then `data` is empty): whoever files the mail moves that file into the store.
    """

    filename: str
    content_type: str
    data: bytes
    inline: bool
    content_id: str | None
    spooled: SpooledFile | None = None

    @property
    def size(self) -> int:
        """The decoded content's length in bytes."""
        return self.spooled.size if self.spooled is not None else len(self.data)

    def read(self) -> bytes:
        """The decoded content, read from its spool file if it has one."""
        if self.spooled is None:
            return self.data
        with open(self.spooled.path, "rb") as spooled:
            return spooled.read()


@dataclass(frozen=True)
class ParsedMail:
    """A decoded mail, ready for the classify and store stages."""

    message: EmailMessage
    message_id: str | None
    in_reply_to: list[str]
    references: list[str]
    subject: str
    from_name: str
    from_address: str
    to: list[str]
    cc: list[str]
    delivered_to: list[str]
    date: datetime | None
    text: str
    html: str | None
    attachments: list[ParsedAttachment]
    # Why the From cannot be trusted to name the sender (several addresses, an address posing
    # as the display name, junk beside the address), or None. The mail stays readable; the
    # pipeline quarantines it with this reason.
    from_problem: str | None = None
    reply_to: list[str] = field(default_factory=list)  # Clean addr-specs from Reply-To.
    truncated: bool = False  # The text (or HTML) was cut at ParseLimits.max_text_chars.
