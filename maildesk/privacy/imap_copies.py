"""The copies of erased mails in the IMAP processed and quarantine folders, found and deleted.

Each stored mail is looked for by its Message-ID (SEARCH HEADER), and a hit counts only when the
SHA-256 of the fetched bytes is the one we stored, so that another mail quoting that Message-ID
is never deleted. A mail without a Message-ID is looked for by hashing every mail of a folder,
but only in a folder of at most FEW_MAILS mails; elsewhere it is reported as not found.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from imapclient.exceptions import IMAPClientError

from maildesk.config import ImapSettings
from maildesk.ingress.fetch import FETCH_BATCH, ImapFetcher
from maildesk.ingress.imap import ImapConnection
from maildesk.store.files import sha256_hex

__all__ = ["FEW_MAILS", "IMAPClientError", "MailCopy", "delete"]

FEW_MAILS = 200


@dataclass(frozen=True)
class MailCopy:
    """What identifies a stored mail's copy on the server."""

    inbound_id: int
    message_id: str | None
    sha256: str
    # Only the header section of an oversized mail was stored, so only it can be compared.
    header_only: bool = False


class _NoIntake:
    """The fetcher's store side, which a connection that only deletes never uses."""

    def store(self, arrivals: list[Any]) -> list[Any]:
        raise RuntimeError("this connection only deletes erased mails")

    def checkpoint(self, mailbox: str, uidvalidity: int, uids: list[int]) -> dict[int, int]:
        return {}

    def raw_writer(self) -> None:
        return None

    def outcomes(self, ids: list[int]) -> dict[int, str]:
        return {}


class _FolderAccess(ImapFetcher):
    """The fetcher's own way of connecting, to reach the folders it files mails into."""

    def __init__(self, settings: ImapSettings) -> None:
        super().__init__(settings, _NoIntake(), max_mail_bytes=1)

    def connect(self) -> ImapConnection:
        """A logged-in connection with the folders' names as the server spells them."""
        return self._open()


def _hashes(conn: ImapConnection, uids: list[int], header_only: bool) -> dict[int, str]:
    hashes: dict[int, str] = {}
    for start in range(0, len(uids), FETCH_BATCH):
        batch = uids[start : start + FETCH_BATCH]
        data = conn.headers(batch) if header_only else conn.bodies(batch)
        hashes.update({uid: sha256_hex(raw) for uid, raw in data.items()})
    return hashes


def _search_id(conn: ImapConnection, message_id: str) -> list[int]:
    bare = message_id.strip().strip("<>").strip()
    if not bare or not bare.isascii() or '"' in bare or "\\" in bare:
        return []
    return [int(uid) for uid in conn.client.search(["HEADER", "Message-ID", bare])]


def _in_folder(
    conn: ImapConnection, folder: str, copies: list[MailCopy]
) -> tuple[set[int], set[int]]:
    """The UIDs in `folder` that are copies, and the inbound ids they belong to."""
    conn.client.select_folder(folder)
    doomed: set[int] = set()
    found: set[int] = set()
    everything: list[int] | None = None
    for copy in copies:
        uids = _search_id(conn, copy.message_id) if copy.message_id else None
        if uids is None:
            if everything is None:
                everything = [int(uid) for uid in conn.client.search("ALL")]
            if len(everything) > FEW_MAILS:
                continue
            uids = everything
        matches = [uid for uid, digest in _hashes(conn, uids, copy.header_only).items()
                   if digest == copy.sha256]
        if matches:
            doomed.update(matches)
            found.add(copy.inbound_id)
    return doomed, found


def delete(settings: ImapSettings, copies: list[MailCopy]) -> tuple[int, list[str]]:
    """Delete the copies in the processed and quarantine folders; returns how many were
    deleted and a line for each mail found in neither.
    """
    conn = _FolderAccess(settings).connect()
    deleted = 0
    found: set[int] = set()
    try:
        for folder in (conn.processed, conn.quarantine):
            doomed, here = _in_folder(conn, folder, copies)
            found |= here
            if not doomed:
                continue
            uids = sorted(doomed)
            conn.client.delete_messages(uids, silent=True)
            if conn.uidplus:
                conn.client.uid_expunge(uids)
            else:
                conn.client.expunge()
            deleted += len(uids)
    finally:
        with contextlib.suppress(OSError, IMAPClientError):
            conn.logout()
    missing = []
    for copy in copies:
        if copy.inbound_id in found:
            continue
        why = ("no Message-ID, and the folders hold too many mails to compare them all"
               if not copy.message_id else "not in the processed or quarantine folder")
        missing.append(f"mail {copy.inbound_id}: {why}")
    return deleted, missing
