"""The store's tables, as SQLModel classes.

The schema itself is owned by the Alembic migrations in `maildesk/store/migrations`; these classes
must stay in step with them (a test compares the two).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware.

    SQLite keeps no time zone, so values are normalised to UTC on the way in and tagged as UTC
    on the way out; PostgreSQL gets a `timestamptz` column.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# An InboundMail's state from intake until the runner has filed it.
RECEIVED = "received"


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def _when(nullable: bool = False, **kwargs: Any) -> Any:
    return Field(sa_column=sa.Column(UTCDateTime(), nullable=nullable, **kwargs))


def _created() -> Any:
    return Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


class Company(SQLModel, table=True):
    """A customer company; its after-hours subscription lets US staff see its data."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=200)
    after_hours: bool = False
    active: bool = True
    created_at: datetime = _created()


class Account(SQLModel, table=True):
    """A person whom their company authorised to open tickets."""

    id: int | None = Field(default=None, primary_key=True)
    # Stored lowercased so that uniqueness is case-insensitive on every database.
    email: str = Field(unique=True, max_length=320)
    name: str = Field(max_length=200)
    phone: str | None = Field(default=None, max_length=50)
    company_id: int = Field(foreign_key="company.id", index=True)
    locale: str = Field(default="fr", max_length=5)
    created_at: datetime = _created()
    deactivated_at: datetime | None = _when(nullable=True)
    # The person's rights (privacy/rights.py): restricted, their data are kept but not
    # processed; their objection, awaiting the DPO; their post-mortem directive ("keep",
    # "erase" or "export-to" directive_address) and the day it was carried out.
    restricted_at: datetime | None = _when(nullable=True)
    objected_at: datetime | None = _when(nullable=True)
    directive: str | None = Field(default=None, max_length=10)
    directive_address: str | None = Field(default=None, max_length=320)
    deceased_at: datetime | None = _when(nullable=True)
    # When the full privacy notice was queued to them: with the welcome, else with their
    # first mail from the desk.
    notice_sent_at: datetime | None = _when(nullable=True)


class Agent(SQLModel, table=True):
    """A member of the vendor's support staff, in the EU or the US."""

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(unique=True, max_length=320)
    name: str = Field(max_length=200)
    region: str = Field(max_length=2)
    active: bool = True
    created_at: datetime = _created()


class Ticket(SQLModel, table=True):
    """A support request and its thread."""

    id: int | None = Field(default=None, primary_key=True)
    subject: str = Field(max_length=998)
    status: str = Field(default="open", max_length=20, index=True)
    account_id: int = Field(foreign_key="account.id", index=True)
    company_id: int = Field(foreign_key="company.id", index=True)
    created_at: datetime = _created()
    updated_at: datetime = _created()
    # Part of every reply address's signature: raising it revokes all addresses issued so far.
    reply_epoch: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    # The ticket's life (store/ticket_life.py): low, normal, high or urgent; the one agent it is
    # assigned to; when its status last changed, which the reopen and auto-close rules count
    # from; the ticket it was merged into, and the closed ticket that it follows up.
    priority: str = Field(default="normal", max_length=10,
                          sa_column_kwargs={"server_default": "normal"})
    assignee_id: int | None = Field(default=None, foreign_key="agent.id", index=True)
    status_changed_at: datetime | None = _when(nullable=True)
    merged_into_id: int | None = Field(default=None, foreign_key="ticket.id")
    follows_id: int | None = Field(default=None, foreign_key="ticket.id")


class InboundMail(SQLModel, table=True):
    """One mail received, whatever became of it: the ledger that makes intake idempotent."""

    __table_args__ = (
        sa.UniqueConstraint("mailbox", "uidvalidity", "uid", name="uq_inboundmail_imap_uid"),
    )

    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(max_length=10)
    raw_path: str = Field(max_length=500)
    # Unique: the same bytes delivered twice (an MTA retry, two instances reading one
    # mailbox) are one mail, and the database settles any race between the deliveries.
    sha256: str = Field(max_length=64, unique=True, index=True)
    size: int = 0
    mailbox: str | None = Field(default=None, max_length=500)
    uidvalidity: int | None = Field(default=None, sa_type=sa.BigInteger)
    uid: int | None = Field(default=None, sa_type=sa.BigInteger)
    message_id: str | None = Field(default=None, max_length=998, index=True)
    envelope_from: str | None = Field(default=None, max_length=320)
    # The envelope recipients the listener accepted (a JSON list), which name reply addresses
    # that a mail's own headers may not show.
    recipients: str | None = None
    # The size the IMAP server declared for a mail over the limit: only its header was taken.
    oversize: int | None = Field(default=None, sa_type=sa.BigInteger)
    # "received" until the intake runner files it; then what became of it.
    outcome: str = Field(default=RECEIVED, max_length=20, index=True)
    reason: str | None = None
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id")
    received_at: datetime = _created()
    processed_at: datetime | None = _when(nullable=True)
    # The queue discipline (store/queue.py): who holds the mail and until when, by the database's
    # clock; claims so far without an outcome (a crash counts), and the last error.
    claimed_by: str | None = Field(default=None, max_length=100)
    lease_until: datetime | None = _when(nullable=True)
    attempts: int = 0
    next_attempt_at: datetime | None = _when(nullable=True)
    last_error: str | None = None


class Message(SQLModel, table=True):
    """One message in a ticket's thread, from a customer, an agent or maildesk itself."""

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    direction: str = Field(max_length=3)
    author_kind: str = Field(max_length=10)
    author_email: str = Field(max_length=320)
    author_name: str = Field(default="", max_length=200)
    account_id: int | None = Field(default=None, foreign_key="account.id")
    agent_id: int | None = Field(default=None, foreign_key="agent.id")
    message_id: str | None = Field(default=None, max_length=998, index=True)
    in_reply_to: str | None = Field(default=None, max_length=998)
    matched_by: str | None = Field(default=None, max_length=20)
    text: str = ""
    html: str | None = None
    inbound_mail_id: int | None = Field(default=None, foreign_key="inboundmail.id")
    created_at: datetime = _created()
    # The rule of the chain that decided the mail (rules/chain.py), for whoever asks why.
    rule: str | None = Field(default=None, max_length=40)
    # An agent's note: part of the thread for the agents, never sent to the customer.
    internal: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})


class TicketWatcher(SQLModel, table=True):
    """An agent who asked to hear of a ticket's follow-ups, assigned to them or not."""

    __table_args__ = (
        sa.UniqueConstraint("ticket_id", "agent_id", name="uq_ticketwatcher_ticket_agent"),
    )

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id")
    agent_id: int = Field(foreign_key="agent.id", index=True)
    created_at: datetime = _created()


class TicketFollower(SQLModel, table=True):
    """A customer's colleague who follows their ticket: their replies land on it, answers
    reach them too."""

    __table_args__ = (
        sa.UniqueConstraint("ticket_id", "account_id", name="uq_ticketfollower_ticket_account"),
    )

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id")
    account_id: int = Field(foreign_key="account.id", index=True)
    created_at: datetime = _created()


class Attachment(SQLModel, table=True):
    """A file attached to a message; its bytes live in the content-addressed store."""

    id: int | None = Field(default=None, primary_key=True)
    message_id: int = Field(foreign_key="message.id", index=True)
    sha256: str = Field(max_length=64, index=True)
    filename: str = Field(max_length=255)
    content_type: str = Field(max_length=255)
    size: int
    inline: bool = False
    content_id: str | None = Field(default=None, max_length=255)


class Outbox(SQLModel, table=True):
    """A rendered mail waiting to leave, written in the transaction that caused it."""

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=40)
    message_id: str = Field(max_length=998, unique=True)
    mail_from: str = Field(max_length=320)
    recipients: str
    # The mail in MIME form, for rows queued before drafts; empty when `draft` is set.
    raw: bytes = Field(sa_type=sa.LargeBinary)
    # What the mail says, as JSON (outbound/compose.py): the sender builds its MIME form just
    # before it leaves, outside the transaction that queued it, and attachments stay in the
    # content-addressed store instead of being copied into every row.
    draft: str | None = Field(default=None, sa_type=sa.Text)
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    status: str = Field(default="pending", max_length=10, index=True)
    attempts: int = 0
    next_attempt_at: datetime = _created()
    last_error: str | None = None
    created_at: datetime = _created()
    sent_at: datetime | None = _when(nullable=True)
    # Automatic mail (acknowledgements, notices, answers to strangers) counts against the
    # per-mailbox daily limit, by the recipient's normalised mailbox.
    automatic: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})
    mailbox_key: str | None = Field(default=None, max_length=320, index=True)
    # The token of the VERP return path, support+bounce-<verp>@domain, that names this mail in
    # a bounce.
    verp: str | None = Field(default=None, max_length=64, unique=True)
    # The queue discipline (store/queue.py): the sender that holds the row and until when.
    # `attempts` counts claims without an outcome (a crashed sender); `deferrals` counts the
    # temporary failures that set the backoff, and neither gives up on a mail: its deadline does.
    claimed_by: str | None = Field(default=None, max_length=100)
    lease_until: datetime | None = _when(nullable=True)
    deferrals: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


class RightsRequest(SQLModel, table=True):
    """A customer's mail that asks to exercise a right, and the day it must be answered by."""

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    account_id: int | None = Field(default=None, foreign_key="account.id", index=True)
    # access, erasure, rectification, objection, restriction, portability or generic.
    kind: str = Field(max_length=20)
    received_at: datetime = _created()
    # One month after receipt (GDPR Art. 12(3)), in the desk's time zone.
    due_on: date
    closed_at: datetime | None = _when(nullable=True)


class AuditEvent(SQLModel, table=True):
    """Who did what to which ticket or account, and when."""

    id: int | None = Field(default=None, primary_key=True)
    actor: str = Field(max_length=320)
    action: str = Field(max_length=60, index=True)
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    account_id: int | None = Field(default=None, foreign_key="account.id", index=True)
    detail: str | None = None
    at: datetime = _created()


class DeskSecret(SQLModel, table=True):
    """A secret that every instance of the desk shares, such as a reply key made at first use."""

    name: str = Field(primary_key=True, max_length=60)
    value: str = Field(max_length=200)
    created_at: datetime = _created()


class Lease(SQLModel, table=True):
    """Work that one instance at a time does (reading a mailbox): who holds it, until when."""

    name: str = Field(primary_key=True, max_length=300)
    holder: str = Field(max_length=100)
    until: datetime = _when()
