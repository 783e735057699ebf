"""The pipeline: one raw mail in, one committed transaction out.

Both ingress stages (fetch for IMAP, listen for SMTP/LMTP) hand the raw bytes to
`Pipeline.process`, which parses, classifies, routes, stores and enqueues notifications in one
database transaction, and returns only after that transaction has committed.
"""

from __future__ import annotations

from dataclasses import dataclass


class StoreUnavailable(Exception):
    """The database could not take the mail; the sender should try again later."""


@dataclass(frozen=True)
class Delivery:
    """Where a raw mail came from."""

    source: str  # "imap", "smtp" or "lmtp"
    mailbox: str | None = None
    uidvalidity: int | None = None
    uid: int | None = None
    envelope_from: str | None = None
    recipients: tuple[str, ...] = ()


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
