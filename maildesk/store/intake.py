"""Intake: make received mails durable, a batch at a time, before anyone answers for them.

Ingress does nothing else with a mail: its raw bytes go to the content-addressed store and an
InboundMail row in state "received" records it, all the mails of a batch in one transaction.
Only after that commit does the listener answer 250 or the fetcher move the mail on; the intake
runner files it later. The SHA-256 is unique: the same bytes delivered twice (an MTA that lost
our 250, two instances reading one mailbox, a mailbox whose UIDVALIDITY changed) are one mail.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import Session, col, select

from maildesk.mail.message import Delivery, StoreUnavailable
from maildesk.store.files import RAW_DIR, RawWriter, content_path, sha256_hex, write_once
from maildesk.store.handoff import Handoff
from maildesk.store.models import RECEIVED, InboundMail
from maildesk.store.queue import Queue

# The intake queue: rows wait as "received" until the runner files them. A mail is poison after
# four claims without an outcome: the first may have been any mail's of its batch, and the runner
# files a suspect alone after that, so the other three crashes were its own.
INTAKE_QUEUE = Queue(
    table=InboundMail.metadata.tables["inboundmail"],
    wanted=InboundMail.metadata.tables["inboundmail"].c.outcome == RECEIVED,
    poison_after=4,
)


@dataclass(frozen=True)
class Arrival:
    """A mail as ingress received it: its bytes, or the raw file it was written to as it came
    (`kept`: its SHA-256 and path, from `files.RawWriter.keep`, and its size)."""

    raw: bytes
    delivery: Delivery
    kept: tuple[str, str, int] | None = None

    @property
    def size(self) -> int:
        """The mail's length in bytes."""
        return self.kept[2] if self.kept is not None else len(self.raw)


@dataclass(frozen=True)
class Accepted:
    """A mail made durable: its row, and whether those bytes had been stored before."""

    inbound_id: int
    duplicate: bool


@dataclass(frozen=True)
class HandedMail:
    """A mail stored already claimed for this instance's runner (store/handoff.py): the row's
    columns that the runner's own claim would have read."""

    id: int
    attempts: int
    last_error: str | None
    raw_path: str
    source: str
    mailbox: str | None
    uidvalidity: int | None
    uid: int | None
    envelope_from: str | None
    recipients: str | None
    oversize: int | None
    received_at: datetime
    size: int


IntakeHandoff = Handoff[HandedMail]


def _handed(row: InboundMail) -> HandedMail:
    assert row.id is not None
    return HandedMail(
        id=row.id, attempts=row.attempts, last_error=row.last_error, raw_path=row.raw_path,
        source=row.source, mailbox=row.mailbox, uidvalidity=row.uidvalidity, uid=row.uid,
        envelope_from=row.envelope_from, recipients=row.recipients, oversize=row.oversize,
        received_at=row.received_at, size=row.size,
    )  # fmt: skip


def _write_raw(state_dir: Path, raw: bytes) -> tuple[str, str]:
    digest = sha256_hex(raw)
    path = content_path(state_dir, RAW_DIR, digest)
    # The file is fsynced, with its directory entry, before the row that names it commits.
    write_once(path, raw)
    return digest, str(path.relative_to(state_dir))


def _row(arrival: Arrival, digest: str, raw_path: str) -> InboundMail:
    delivery = arrival.delivery
    return InboundMail(
        source=delivery.source,
        raw_path=raw_path,
        sha256=digest,
        size=delivery.oversize or arrival.size,
        mailbox=delivery.mailbox,
        uidvalidity=delivery.uidvalidity,
        uid=delivery.uid,
        envelope_from=(delivery.envelope_from or "")[:320] or None,
        recipients=json.dumps(list(delivery.recipients)) if delivery.recipients else None,
        oversize=delivery.oversize,
        outcome=RECEIVED,
    )


def store_arrivals(
    engine: sa.Engine, state_dir: Path, arrivals: Sequence[Arrival],
    handoff: IntakeHandoff | None = None,
) -> list[Accepted]:  # fmt: skip
    """Make a batch of mails durable in one transaction; one Accepted per arrival, in order.

    With `handoff`, while the runner idles, the new rows are stored claimed for it and handed
    over once committed. Raises the database's error when the batch could not be stored: then
    none of it was.
    """
    files = [
        arrival.kept[:2] if arrival.kept is not None else _write_raw(state_dir, arrival.raw)
        for arrival in arrivals
    ]
    # The fetcher and the listener store in threads of their own: both may find the runner
    # accepting at once, and then it is handed two batches together, at most twice a claim.
    if handoff is not None and not handoff.accepting(
        len(arrivals), sum(arrival.size for arrival in arrivals)
    ):
        handoff = None
    try:
        return _insert(engine, arrivals, files, handoff)
    except sa.exc.IntegrityError:
        # Another instance stored some of the same bytes since our look-up; the second pass
        # finds them and takes them as duplicates.
        return _insert(engine, arrivals, files, handoff)


def _insert(
    engine: sa.Engine, arrivals: Sequence[Arrival], files: list[tuple[str, str]],
    handoff: IntakeHandoff | None,
) -> list[Accepted]:  # fmt: skip
    digests = sorted({digest for digest, _ in files})
    with Session(engine, expire_on_commit=False) as session:
        earlier: dict[str, InboundMail] = {}
        # Chunks keep the IN list within every database's limit on parameters.
        for start in range(0, len(digests), 500):
            chunk = digests[start : start + 500]
            rows = session.exec(select(InboundMail).where(col(InboundMail.sha256).in_(chunk)))
            earlier.update((row.sha256, row) for row in rows)
        fresh: dict[str, InboundMail] = {}
        for arrival, (digest, raw_path) in zip(arrivals, files, strict=True):
            if digest in earlier:
                _follow_resync(earlier[digest], arrival.delivery)
                session.add(earlier[digest])
            elif digest not in fresh:
                fresh[digest] = _row(arrival, digest, raw_path)
                if handoff is not None:
                    handoff.claim(fresh[digest], engine)
                session.add(fresh[digest])
        session.flush()
        accepted = [
            Accepted(earlier[digest].id, True) if digest in earlier  # type: ignore[arg-type]
            else Accepted(fresh[digest].id, False)  # type: ignore[arg-type]
            for digest, _ in files
        ]
        session.commit()
    if handoff is not None:
        handoff.hand(sorted((_handed(row) for row in fresh.values()), key=lambda m: m.id))
    # Within a batch, the second copy of the same bytes is a duplicate of the first.
    seen: set[int] = set()
    result = []
    for item in accepted:
        result.append(Accepted(item.inbound_id, item.duplicate or item.inbound_id in seen))
        seen.add(item.inbound_id)
    return result


def _follow_resync(row: InboundMail, delivery: Delivery) -> None:
    """Point a stored IMAP mail at its new UID after its mailbox's UIDVALIDITY changed.

    The fetcher's checkpoint is the (mailbox, UIDVALIDITY, UID) of stored mails; without this,
    every mail of a resynced mailbox would be downloaded again at each scan.
    """
    if (
        delivery.source == "imap" and row.source == "imap" and row.mailbox == delivery.mailbox
        and delivery.uidvalidity is not None and row.uidvalidity != delivery.uidvalidity
    ):  # fmt: skip
        row.uidvalidity, row.uid = delivery.uidvalidity, delivery.uid


def outcomes(engine: sa.Engine, ids: Sequence[int]) -> dict[int, str]:
    """The state of each of these rows: "received", or what became of the mail."""
    found: dict[int, str] = {}
    unique = sorted(set(ids))
    with Session(engine) as session:
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            rows = session.exec(
                select(InboundMail.id, InboundMail.outcome).where(col(InboundMail.id).in_(chunk))
            )
            found.update((row_id, outcome) for row_id, outcome in rows if row_id is not None)
    return found


def stored_uids(
    engine: sa.Engine, mailbox: str, uidvalidity: int, uids: list[int]
) -> dict[int, int]:
    """Which of these IMAP UIDs were stored already, each with its row id: the checkpoint."""
    found: dict[int, int] = {}
    with Session(engine) as session:
        for start in range(0, len(uids), 500):
            chunk = uids[start : start + 500]
            rows = session.exec(
                select(InboundMail.uid, InboundMail.id).where(
                    InboundMail.mailbox == mailbox,
                    InboundMail.uidvalidity == uidvalidity,
                    col(InboundMail.uid).in_(chunk),
                )
            )
            found.update((uid, row_id) for uid, row_id in rows if uid is not None and row_id)
    return found



class IntakeStore:
    """The store's side of intake, as the fetcher and the listener call it (blocking)."""

    def __init__(
        self, engine: sa.Engine, state_dir: Path, *,
        on_stored: Callable[[], object] | None = None, handoff: IntakeHandoff | None = None,
    ) -> None:  # fmt: skip
        """Store into `engine` and `state_dir`; `on_stored` wakes the runner after each commit,
        to which `handoff` hands what it stored while the runner idled (the runner's own)."""
        self.engine = engine
        self.state_dir = state_dir
        self.on_stored: Callable[[], object] = on_stored or (lambda: None)
        self.handoff = handoff

    def store(self, arrivals: Sequence[Arrival]) -> list[Accepted]:
        """Make a batch durable (StoreUnavailable when the database or the disk refused)."""
        try:
            accepted = store_arrivals(self.engine, self.state_dir, arrivals, self.handoff)
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError,
                OSError) as exc:  # fmt: skip
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        self.on_stored()
        return accepted

    def raw_writer(self) -> RawWriter:
        """A new raw file of the store, for a large mail written as it is fetched."""
        return RawWriter(self.state_dir)

    def checkpoint(self, mailbox: str, uidvalidity: int, uids: list[int]) -> dict[int, int]:
        """Which of these IMAP UIDs are stored already, each with its row id."""
        try:
            return stored_uids(self.engine, mailbox, uidvalidity, uids)
        except sa.exc.OperationalError as exc:
            raise StoreUnavailable(str(exc)) from exc

    def outcomes(self, ids: list[int]) -> dict[int, str]:
        """Each row's state: "received" until filed, then its outcome."""
        try:
            return outcomes(self.engine, ids)
        except sa.exc.OperationalError as exc:
            raise StoreUnavailable(str(exc)) from exc
