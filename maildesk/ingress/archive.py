"""Archive import: file a past support mailbox (mbox or maildir) into tickets, telling nobody.

Each mail goes through intake like any other, with the source "import": the runner files it
with the notifier silenced, so that not a single mail is sent. The SHA-256 dedup of intake makes
an import resumable: run again after a kill, it stores only what it had not stored, and files
whatever it stored without filing.
"""

from __future__ import annotations

import mailbox
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from email.parser import BytesHeaderParser
from email.utils import parsedate_to_datetime
from pathlib import Path

from maildesk.mail.message import IMPORT_SOURCE, Delivery
from maildesk.store.intake import Arrival, IntakeStore

BATCH = 50


class ArchiveError(Exception):
    """The archive cannot be read; the message names it."""


@dataclass
class ImportReport:
    """What an import did: mails seen, skipped by date, stored anew, already there, and what
    became of them by outcome and reason."""

    seen: int = 0
    skipped: int = 0
    stored: int = 0
    duplicates: int = 0
    ids: list[int] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)


def read_archive(kind: str, path: Path) -> Iterator[bytes]:
    """The raw mails of an mbox file or a maildir, in their order."""
    if kind == "mbox":
        if not path.is_file():
            raise ArchiveError(f"{path}: no such mbox file")
        box: mailbox.Mailbox = mailbox.mbox(path, create=False)
    elif kind == "maildir":
        if not (path / "cur").is_dir() and not (path / "new").is_dir():
            raise ArchiveError(f"{path}: not a maildir (no cur/ or new/)")
        box = mailbox.Maildir(path, create=False)
    else:
        raise ArchiveError(f"unknown archive kind {kind!r}")
    try:
        for key in box.iterkeys():
            yield box.get_bytes(key)
    finally:
        box.close()


def mail_date(raw: bytes) -> datetime | None:
    """The Date header of a raw mail, if it has a readable one."""
    value = BytesHeaderParser().parsebytes(raw[: 256 * 1024]).get("Date")
    if not value:
        return None
    try:
        when = parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo else None


def store_archive(
    intake: IntakeStore,
    raws: Iterator[bytes],
    *,
    since: datetime | None = None,
    progress: Callable[[ImportReport], object] | None = None,
) -> ImportReport:
    """Store every mail of the archive (newer than `since`) in batches; returns the report."""
    report = ImportReport()
    batch: list[Arrival] = []

    def flush() -> None:
        for item in intake.store(batch):
            report.ids.append(item.inbound_id)
            if item.duplicate:
                report.duplicates += 1
            else:
                report.stored += 1
        batch.clear()
        if progress is not None:
            progress(report)

    for raw in raws:
        report.seen += 1
        if since is not None:
            when = mail_date(raw)
            if when is not None and when < since:
                report.skipped += 1
                continue
        batch.append(Arrival(raw, Delivery(source=IMPORT_SOURCE)))
        if len(batch) >= BATCH:
            flush()
    if batch:
        flush()
    return report
