"""One logged-in IMAP connection: a method per IMAP verb the fetcher uses, all blocking.

Call them in a worker thread (`asyncio.to_thread`), so that the event loop never waits on the
network.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ssl
import time
from collections.abc import Callable

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from maildesk.config import ImapSettings
from maildesk.logs import get_logger

log = get_logger("fetch")

HEADER_CAP = 256 * 1024  # the most of an oversized mail's header section that is downloaded
PIECE_BYTES = 1024 * 1024  # the bytes of a large mail fetched at a time
IDLE_CHECK_SECONDS = 1.0  # how often IDLE looks at `stop`
IDLE_BLIND_SECONDS = 5.0  # the IDLE bound when imaplib's read buffer cannot be inspected


class ImapConnection:
    """One logged-in IMAP connection; every method blocks, so call them in a worker thread."""

    def __init__(self, client: IMAPClient, settings: ImapSettings) -> None:
        self.client = client
        self.use_move = client.has_capability("MOVE")
        self.use_idle = settings.idle and client.has_capability("IDLE")
        self.uidplus = client.has_capability("UIDPLUS")
        # Settings write nested folders with "/"; the server may use another delimiter.
        listing = client.list_folders("", "")
        raw = listing[0][1] if listing else None
        delimiter = raw.decode() if isinstance(raw, bytes) else raw
        self.folder, self.processed, self.quarantine = (
            name.replace("/", delimiter) if delimiter and delimiter != "/" else name
            for name in (settings.folder, settings.processed_folder, settings.quarantine_folder)
        )
        self.idling = False

    def ensure_folders(self) -> None:
        """Create the processed and quarantine folders when they are missing."""
        for name in (self.processed, self.quarantine):
            if self.client.folder_exists(name):
                continue
            try:
                self.client.create_folder(name)
            except IMAPClientError:
                # Another client may have created it in the meantime; only a real failure counts.
                if not self.client.folder_exists(name):
                    raise
            # Subscribing makes the folder visible in the operator's mail client; optional.
            with contextlib.suppress(IMAPClientError):
                self.client.subscribe_folder(name)
            log.info("imap.folder_created", folder=name)

    def scan(self) -> tuple[int, list[int], bool]:
        """Select the watched folder; return its UIDVALIDITY, all its UIDs (ascending) and
        whether the server announced more mail while it searched.
        """
        uidvalidity = int(self.client.select_folder(self.folder)[b"UIDVALIDITY"])
        # A mail that arrives between SELECT and the end of SEARCH is not among the results:
        # the search runs on the folder as the session last saw it. The server then announces
        # it once, with an untagged "* N EXISTS" inside the SEARCH response, which imapclient
        # files away in imaplib's untagged responses without returning it. The IDLE that
        # follows would not announce it again, so the mail would wait a whole poll interval.
        # imaplib's response() hands over (and forgets) what was filed under a name: drop the
        # count that SELECT reported, then any EXISTS after the search means new mail.
        imap = self.client._imap
        imap.response("EXISTS")
        uids = sorted(int(uid) for uid in self.client.search("ALL"))
        _, announced = imap.response("EXISTS")
        return uidvalidity, uids, announced != [None]

    def sizes(self, uids: list[int]) -> dict[int, int]:
        """The declared size (RFC822.SIZE) of each UID still in the folder."""
        data = self.client.fetch(uids, ["RFC822.SIZE"])
        return {int(uid): int(item[b"RFC822.SIZE"]) for uid, item in data.items()}

    def bodies(self, uids: list[int]) -> dict[int, bytes]:
        """Fetch raw mails without setting \\Seen (BODY.PEEK), keyed by UID."""
        data = self.client.fetch(uids, ["BODY.PEEK[]"])
        return {int(uid): bytes(item[b"BODY[]"]) for uid, item in data.items()}

    def body_in_pieces(self, uid: int, write: Callable[[bytes], object]) -> bool:
        """Fetch one raw mail PIECE_BYTES at a time into `write`; False if it is gone."""
        # Partial FETCHes, so that a large mail is never in memory whole: imaplib and imapclient
        # hold about four copies of a literal while they read and parse it.
        offset = 0
        while True:
            data = self.client.fetch([uid], [f"BODY.PEEK[]<{offset}.{PIECE_BYTES}>"])
            item = data.get(uid)
            if item is None:
                return False  # Expunged by someone else meanwhile.
            piece = item.get(b"BODY[]<%d>" % offset) or b""
            write(piece)
            offset += len(piece)
            if len(piece) < PIECE_BYTES:
                return True

    def headers(self, uids: list[int]) -> dict[int, bytes]:
        """Fetch at most HEADER_CAP bytes of each mail's header section, keyed by UID."""
        # A partial fetch, so that a mail made of one endless header cannot fill memory either.
        data = self.client.fetch(uids, [f"BODY.PEEK[HEADER]<0.{HEADER_CAP}>"])
        return {int(uid): bytes(item[b"BODY[HEADER]<0>"]) for uid, item in data.items()}

    def move(self, uids: list[int], folder: str) -> None:
        """Move UIDs to a folder: MOVE, else COPY + \\Deleted + UID EXPUNGE of just those."""
        if self.use_move:
            self.client.move(uids, folder)
            return
        self.client.copy(uids, folder)
        self.client.add_flags(uids, [b"\\Deleted"], silent=True)
        if self.uidplus:
            self.client.uid_expunge(uids)
        else:
            # Without UIDPLUS only a plain EXPUNGE exists; it also removes other mails that
            # a user flagged \Deleted in this folder, which they asked for anyway.
            self.client.expunge()

    def idle(self, stop: asyncio.Event, seconds: float) -> None:
        """IDLE until the server reports anything, `stop` is set or `seconds` have passed."""
        deadline = time.monotonic() + seconds
        self.client.idle()
        self.idling = True
        # Short idle_checks so that `stop` (a plain flag, safe to read here) is seen quickly.
        while not stop.is_set() and time.monotonic() < deadline:
            # idle_check() waits with poll() on the socket, but the server's news may already
            # have been read off it: Dovecot answers IDLE with "+ idling" and, in the same
            # packet, the "* N EXISTS" of mail that came after our last SEARCH. imaplib reads
            # the whole packet into its buffer to return the "+ idling" line, and the EXISTS
            # then waits there, invisible to poll(), until the IDLE ends. Look there first.
            buffered = _unread_input(self.client)
            if buffered:
                break
            if buffered is None:
                # Without a way to look into the buffer, keep the blind spot short.
                deadline = min(deadline, time.monotonic() + IDLE_BLIND_SECONDS)
            started = time.monotonic()
            if self.client.idle_check(IDLE_CHECK_SECONDS):
                break
            # imapclient swallows EOF inside idle_check and returns early with nothing: take
            # an early empty return as news, so that idle_done() surfaces a broken connection.
            if time.monotonic() - started < IDLE_CHECK_SECONDS / 2:
                break
        self.idling = False
        self.client.idle_done()

    def logout(self) -> None:
        """Say goodbye politely, and close the socket whatever happens."""
        with contextlib.suppress(OSError, IMAPClientError):
            self.client.logout()
        self.abandon()

    def abandon(self) -> None:
        """Close the socket without talking to the server."""
        with contextlib.suppress(OSError, IMAPClientError):
            self.client.shutdown()


def _unread_input(client: IMAPClient) -> bool | None:
    """Whether server data waits in a buffer above the socket, where poll() cannot see it.

    None means that the buffer could not be inspected. This reads imaplib's internals, which
    changed in Python 3.14; tests/ingress/test_imap.py checks that the result still means something.
    """
    sock = client.socket()
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True  # Decrypted by OpenSSL but not yet handed to imaplib.
    state = vars(client._imap)
    readbuf = state.get("_readbuf")
    if isinstance(readbuf, list):
        return any(readbuf)  # Python 3.14 and later: imaplib keeps its own list of chunks.
    reader = state.get("file")
    if not isinstance(reader, io.BufferedReader):
        return None
    # Before 3.14: the socket's BufferedReader. peek() returns what it holds and, only when
    # that is nothing, tries one read from the socket; non-blocking, that read cannot hang,
    # and whatever it gets is news too (the caller then ends the IDLE and reads it).
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return bool(reader.peek(1))
    except OSError:  # Nothing to read: BlockingIOError, or SSLWantReadError with TLS.
        return False
    finally:
        sock.settimeout(timeout)
