"""IMAP ingress: poll or IDLE on a folder, hand each mail to the pipeline, then move it away.

A mail leaves the watched folder only after the pipeline's transaction has committed, so a
crash at any point loses nothing: a mail still in the folder is simply looked at again, and
`stored` tells which of them were stored already (those are only moved). The store's ledger of
UIDs is the checkpoint: only UIDs it does not hold are ever FETCHed.

Sizes come first (RFC822.SIZE): a mail over the size limit is never downloaded whole. Only its
header section is, and the handler gets it with `Delivery.oversize` set, so that the pipeline
can quarantine it and tell its sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ssl
import time
from collections.abc import Callable

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from maildesk.config import ImapSettings
from maildesk.logs import get_logger
from maildesk.mail.message import Delivery, Handler, StoreUnavailable

# (mailbox, uidvalidity, uids) -> the subset of those UIDs already stored.
Stored = Callable[[str, int, list[int]], set[int]]

log = get_logger("fetch")

FETCH_BATCH = 50  # mails per FETCH or MOVE command
FETCH_BATCH_BYTES = 1024 * 1024  # bytes per FETCH of whole mails; a larger mail comes alone
HEADER_CAP = 256 * 1024  # the most of an oversized mail's header section that is downloaded
MAX_ATTEMPTS = 3  # handler failures before a mail is quarantined as poison
IDLE_CHECK_SECONDS = 1.0  # how often IDLE looks at `stop`
IDLE_RENEW_SECONDS = 25 * 60  # RFC 2177: servers may drop an IDLE after 30 minutes
IDLE_BLIND_SECONDS = 5.0  # the IDLE bound when imaplib's read buffer cannot be inspected
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0
SOCKET_TIMEOUT = 60.0  # so that a dead network cannot hang a worker thread forever


class _Connection:
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


class ImapFetcher:
    """Read mails from an IMAP folder into the pipeline, moving each away once it committed."""

    def __init__(
        self, settings: ImapSettings, handler: Handler, stored: Stored, *, max_mail_bytes: int
    ) -> None:
        """Remember the settings, the pipeline callbacks and the largest mail to download whole;
        connect lazily.
        """
        if not settings.username or settings.password is None:
            raise ValueError("IMAP needs a username and a password")
        if settings.folder in (settings.processed_folder, settings.quarantine_folder):
            # Moving a mail into the folder it came from would loop forever.
            raise ValueError("the IMAP folder must differ from the processed and quarantine ones")
        self._settings = settings
        self._handler = handler
        self._stored = stored
        self._max_mail_bytes = max_mail_bytes
        self._conn: _Connection | None = None
        # Failed handler attempts per (uidvalidity, uid); in memory, as a restart may retry.
        self._attempts: dict[tuple[int, int], int] = {}
        self._uidvalidity: int | None = None

    def _can_move(self, client: IMAPClient) -> bool:
        """Whether to use MOVE; a subclass may say no to exercise COPY + EXPUNGE."""
        return bool(client.has_capability("MOVE"))

    def _open(self) -> _Connection:
        """Connect, log in and prepare the folders (blocking)."""
        settings = self._settings
        context = ssl.create_default_context() if settings.tls != "none" else None
        client = IMAPClient(
            settings.host, port=settings.port, ssl=settings.tls == "ssl",
            ssl_context=context, timeout=SOCKET_TIMEOUT,
        )  # fmt: skip
        try:
            if settings.tls == "starttls":
                client.starttls(context)
            assert settings.username is not None and settings.password is not None
            client.login(settings.username, settings.password.get_secret_value())
            conn = _Connection(client, settings)
            conn.use_move = self._can_move(client)
            conn.ensure_folders()
        except BaseException:
            with contextlib.suppress(OSError, IMAPClientError):
                client.shutdown()
            raise
        log.info(
            "imap.connected", host=settings.host, port=settings.port, tls=settings.tls,
            user=settings.username, move=conn.use_move, idle=conn.use_idle,
        )  # fmt: skip
        return conn

    async def _connection(self) -> _Connection:
        if self._conn is None:
            self._conn = await asyncio.to_thread(self._open)
        return self._conn

    async def close(self) -> None:
        """Log out, if connected."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.to_thread(conn.logout)
            log.info("imap.disconnected", host=self._settings.host)

    async def fetch_once(self) -> int:
        """Process every mail waiting; return how many the handler took.

        Raises StoreUnavailable when the database refused a mail (it stays in the folder).
        """
        return await self._drain(asyncio.Event())

    async def _drain(self, stop: asyncio.Event) -> int:
        conn = await self._connection()
        handled = 0
        tried: set[tuple[int, int]] = set()
        # Search again after each pass: mails that arrived meanwhile were announced during
        # other commands, so IDLE would not report them.
        while not stop.is_set():
            uidvalidity, uids, more = await asyncio.to_thread(conn.scan)
            if uidvalidity != self._uidvalidity:
                log.info("imap.selected", folder=conn.folder, uidvalidity=uidvalidity)
                self._uidvalidity = uidvalidity
            # A failed mail stays in place until the next round, not the next pass.
            todo = [uid for uid in uids if (uidvalidity, uid) not in tried]
            if not todo:
                if more:
                    continue  # Mail came during the search itself: look again.
                break
            tried.update((uidvalidity, uid) for uid in todo)
            handled += await self._process(conn, uidvalidity, todo, stop)
        return handled

    async def _process(
        self, conn: _Connection, uidvalidity: int, uids: list[int], stop: asyncio.Event
    ) -> int:
        mailbox = self._settings.folder
        seen = await asyncio.to_thread(self._stored, mailbox, uidvalidity, uids)
        # Stored before but not moved (a crash between commit and move): only move them.
        moves: dict[str, list[int]] = {conn.processed: sorted(seen), conn.quarantine: []}
        if seen:
            log.info("imap.already_stored", count=len(seen), uidvalidity=uidvalidity)
        fresh = [uid for uid in uids if uid not in seen]
        handled = 0
        try:
            for start in range(0, len(fresh), FETCH_BATCH):
                if stop.is_set():
                    break
                chunk = fresh[start : start + FETCH_BATCH]
                sizes = await asyncio.to_thread(conn.sizes, chunk)
                for group, headers_only in plan_downloads(chunk, sizes, self._max_mail_bytes):
                    if stop.is_set():
                        break
                    oversizes = {uid: sizes[uid] for uid in group} if headers_only else {}
                    handled += await self._download(
                        conn, uidvalidity, group, oversizes, moves, stop
                    )
                    # Moving a whole batch at once costs one command instead of fifty; a crash
                    # before it only means those mails are found again and moved via `seen`.
                    await self._flush(conn, moves)
        except StoreUnavailable:
            await self._flush(conn, moves)
            raise
        await self._flush(conn, moves)
        return handled

    async def _download(
        self, conn: _Connection, uidvalidity: int, uids: list[int], oversizes: dict[int, int],
        moves: dict[str, list[int]], stop: asyncio.Event,
    ) -> int:  # fmt: skip
        """Fetch and handle one group: whole mails, or only the headers of those in
        `oversizes` (UID to declared size); return how many the handler took.
        """
        fetch = conn.headers if oversizes else conn.bodies
        raws = await asyncio.to_thread(fetch, uids)
        handled = 0
        for uid in uids:
            if stop.is_set():
                break
            if uid not in raws:
                continue  # Expunged by someone else since the search.
            oversize = oversizes.get(uid)
            if oversize is not None:
                log.info(
                    "imap.oversize", uid=uid, uidvalidity=uidvalidity, size=oversize,
                    limit=self._max_mail_bytes,
                )  # fmt: skip
            folder, took = await self._handle(conn, uidvalidity, uid, raws.pop(uid), oversize)
            if folder is not None:
                moves[folder].append(uid)
            handled += took
        return handled

    async def _handle(
        self, conn: _Connection, uidvalidity: int, uid: int, raw: bytes, oversize: int | None
    ) -> tuple[str | None, bool]:
        """Run the handler on one mail; return where to move it (None: keep) and if it took."""
        delivery = Delivery(
            source="imap", mailbox=self._settings.folder, uidvalidity=uidvalidity, uid=uid,
            oversize=oversize,
        )  # fmt: skip
        key = (uidvalidity, uid)
        try:
            outcome = await asyncio.to_thread(self._handler, raw, delivery)
        except StoreUnavailable:
            raise
        except Exception as exc:
            attempts = self._attempts.get(key, 0) + 1
            log.error(
                "imap.handler_failed", uid=uid, uidvalidity=uidvalidity, attempt=attempts,
                error=f"{type(exc).__name__}: {exc}", exc_info=True,
            )  # fmt: skip
            if attempts < MAX_ATTEMPTS:
                self._attempts[key] = attempts
                return None, False
            # A poison mail must not block the queue forever; a human will look at it.
            self._attempts.pop(key, None)
            log.warning("imap.poison_quarantined", uid=uid, uidvalidity=uidvalidity)
            return conn.quarantine, False
        self._attempts.pop(key, None)
        return (conn.quarantine if outcome.quarantined else conn.processed), True

    async def _flush(self, conn: _Connection, moves: dict[str, list[int]]) -> None:
        for folder, uids in moves.items():
            # Slices keep the command line short when many stored mails wait to be moved.
            for start in range(0, len(uids), FETCH_BATCH):
                await asyncio.to_thread(conn.move, uids[start : start + FETCH_BATCH], folder)
            if uids:
                log.debug("imap.moved", count=len(uids), folder=folder)
            uids.clear()

    async def _wait_for_mail(self, stop: asyncio.Event) -> None:
        """IDLE until the server reports something, else sleep for the poll interval."""
        conn = await self._connection()
        if stop.is_set():
            return
        if conn.use_idle:
            # IDLE also ends after the poll interval: a cheap sweep in case news got lost.
            seconds = min(IDLE_RENEW_SECONDS, self._settings.poll_seconds)
            await asyncio.to_thread(conn.idle, stop, seconds)
        else:
            await _sleep(stop, self._settings.poll_seconds)

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch until `stop` is set, reconnecting with backoff after errors."""
        delay = BACKOFF_FIRST
        try:
            while not stop.is_set():
                try:
                    await self._drain(stop)
                    delay = BACKOFF_FIRST
                    await self._wait_for_mail(stop)
                    continue
                except StoreUnavailable:
                    # The connection is fine: keep it, and retry once the database is back.
                    log.warning("imap.store_unavailable", retry_in=delay)
                except LoginError:
                    delay = BACKOFF_MAX
                    user = self._settings.username
                    log.error(f"IMAP login refused for user {user}", retry_in=delay)
                except (OSError, IMAPClientError) as exc:
                    log.warning("imap.connection_error", error=repr(exc), retry_in=delay)
                    self._abandon()
                except Exception:
                    # A bug must not end ingress for good; log it and start over.
                    log.exception("imap.unexpected_error", retry_in=delay)
                    self._abandon()
                await _sleep(stop, delay)
                delay = min(delay * 2, BACKOFF_MAX)
        except asyncio.CancelledError:
            # A worker thread may still be using the connection: close it without a goodbye.
            self._abandon()
            raise
        await self.close()

    def _abandon(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abandon()


def plan_downloads(
    uids: list[int], sizes: dict[int, int], max_mail_bytes: int
) -> list[tuple[list[int], bool]]:
    """Group UIDs into FETCHes, in order: (uids, headers_only).

    Mails up to max_mail_bytes are fetched whole, up to FETCH_BATCH of them and FETCH_BATCH_BYTES
    together (a larger one alone); a mail over max_mail_bytes gets a headers-only FETCH of its
    own. A UID without a size was expunged since the search and is left out.
    """
    plan: list[tuple[list[int], bool]] = []
    group: list[int] = []
    group_bytes = 0
    for uid in uids:
        size = sizes.get(uid)
        if size is None:
            continue
        if size > max_mail_bytes:
            if group:
                plan.append((group, False))
                group, group_bytes = [], 0
            plan.append(([uid], True))
            continue
        if group and (len(group) >= FETCH_BATCH or group_bytes + size > FETCH_BATCH_BYTES):
            plan.append((group, False))
            group, group_bytes = [], 0
        group.append(uid)
        group_bytes += size
    if group:
        plan.append((group, False))
    return plan


def _unread_input(client: IMAPClient) -> bool | None:
    """Whether server data waits in a buffer above the socket, where poll() cannot see it.

    None means that the buffer could not be inspected. This reads imaplib's internals, which
    changed in Python 3.14; tests/test_fetch.py checks that the result still means something.
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


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, waking early when `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
