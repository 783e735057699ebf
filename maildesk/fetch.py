"""IMAP ingress: poll or IDLE on a folder, hand each mail to the pipeline, then move it away.

A mail leaves the watched folder only after the pipeline's transaction has committed, so a
crash at any point loses nothing: a mail still in the folder is simply looked at again, and
`seen` tells whether it was stored already (then it is only moved).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from maildesk.config import ImapSettings
from maildesk.logs import get_logger
from maildesk.pipeline import Delivery, Outcome, StoreUnavailable

Handler = Callable[[bytes, Delivery], Outcome]
Seen = Callable[[str, int, int], bool]

log = get_logger("fetch")

FETCH_BATCH = 50  # mails per FETCH command
FETCH_BATCH_BYTES = 32 * 1024 * 1024  # and at most this much mail in memory at once
MAX_ATTEMPTS = 3  # handler failures before a mail is quarantined as poison
IDLE_CHECK_SECONDS = 1.0  # how often IDLE looks at `stop`
IDLE_RENEW_SECONDS = 25 * 60  # RFC 2177: servers may drop an IDLE after 30 minutes
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0
SOCKET_TIMEOUT = 60.0  # so that a dead network cannot hang a worker thread forever


def uid_set(uids: list[int]) -> str:
    """Write sorted UIDs as a compact IMAP sequence set, such as "1:4,7,9:10"."""
    # Ranges keep the command short when a large backlog is waiting; servers cap line length.
    parts: list[str] = []
    start = prev = uids[0]
    for uid in [*uids[1:], None]:
        if uid is not None and uid == prev + 1:
            prev = uid
            continue
        parts.append(str(start) if start == prev else f"{start}:{prev}")
        if uid is not None:
            start = prev = uid
    return ",".join(parts)


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

    def select(self) -> int:
        """Select the watched folder read-write and return its UIDVALIDITY."""
        return int(self.client.select_folder(self.folder)[b"UIDVALIDITY"])

    def search_all(self) -> list[int]:
        """Return every UID in the selected folder, ascending."""
        return sorted(int(uid) for uid in self.client.search("ALL"))

    def batches(self, uids: list[int]) -> list[list[int]]:
        """Split UIDs into FETCH batches bounded by count and by total size."""
        if not uids:
            return []
        sizes = self.client.fetch(uid_set(uids), ["RFC822.SIZE"])
        batches: list[list[int]] = []
        current: list[int] = []
        total = 0
        for uid in uids:
            if uid not in sizes:
                continue  # Expunged by someone else since the search.
            size = int(sizes[uid].get(b"RFC822.SIZE", 0))
            if current and (len(current) >= FETCH_BATCH or total + size > FETCH_BATCH_BYTES):
                batches.append(current)
                current, total = [], 0
            current.append(uid)
            total += size
        return [*batches, current] if current else batches

    def bodies(self, uids: list[int]) -> dict[int, bytes]:
        """Fetch raw mails without setting \\Seen (BODY.PEEK), keyed by UID."""
        data = self.client.fetch(uid_set(uids), ["BODY.PEEK[]"])
        return {int(uid): bytes(item[b"BODY[]"]) for uid, item in data.items()}

    def move(self, uids: list[int], folder: str) -> None:
        """Move UIDs to a folder: MOVE, else COPY + \\Deleted + UID EXPUNGE of just those."""
        if self.use_move:
            self.client.move(uid_set(uids), folder)
            return
        self.client.copy(uid_set(uids), folder)
        self.client.add_flags(uid_set(uids), [b"\\Deleted"], silent=True)
        if self.uidplus:
            self.client.uid_expunge(uid_set(uids))
        else:
            # Without UIDPLUS only a plain EXPUNGE exists; it also removes other mails that
            # a user flagged \Deleted in this folder, which they asked for anyway.
            self.client.expunge()

    def idle_start(self) -> None:
        """Enter IDLE."""
        self.client.idle()
        self.idling = True

    def idle_wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds in IDLE; return True when the server said something."""
        started = time.monotonic()
        if self.client.idle_check(timeout):
            return True
        # imapclient swallows EOF inside idle_check and returns early with nothing: treat an
        # early empty return as news, so that idle_done() surfaces the broken connection.
        return time.monotonic() - started < timeout / 2

    def idle_done(self) -> None:
        """Leave IDLE."""
        self.idling = False
        self.client.idle_done()

    def logout(self) -> None:
        """Say goodbye politely, and close the socket whatever happens."""
        try:
            if self.idling:
                self.idle_done()
            self.client.logout()
        except (OSError, IMAPClientError):
            pass
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close the socket without talking to the server."""
        with contextlib.suppress(OSError, IMAPClientError):
            self.client.shutdown()


class ImapFetcher:
    """Read mails from an IMAP folder into the pipeline, moving each away once it committed."""

    def __init__(self, settings: ImapSettings, handler: Handler, seen: Seen) -> None:
        """Remember the settings and the pipeline callbacks; connect lazily."""
        if not settings.username or settings.password is None:
            raise ValueError("IMAP needs a username and a password")
        self._settings = settings
        self._handler = handler
        self._seen = seen
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
            uidvalidity = await asyncio.to_thread(conn.select)
            if uidvalidity != self._uidvalidity:
                log.info("imap.selected", folder=conn.folder, uidvalidity=uidvalidity)
                self._uidvalidity = uidvalidity
            uids = await asyncio.to_thread(conn.search_all)
            # A failed mail stays in place until the next round, not the next pass.
            todo = [uid for uid in uids if (uidvalidity, uid) not in tried]
            if not todo:
                break
            tried.update((uidvalidity, uid) for uid in todo)
            handled += await self._process(conn, uidvalidity, todo, stop)
        return handled

    async def _process(
        self, conn: _Connection, uidvalidity: int, uids: list[int], stop: asyncio.Event
    ) -> int:
        mailbox = self._settings.folder
        seen = await asyncio.to_thread(
            lambda: {uid for uid in uids if self._seen(mailbox, uidvalidity, uid)}
        )
        # Stored before but not moved (a crash between commit and move): only move them.
        moves: dict[str, list[int]] = {conn.processed: sorted(seen), conn.quarantine: []}
        if seen:
            log.info("imap.already_stored", count=len(seen), uidvalidity=uidvalidity)
        handled = 0
        try:
            for batch in await asyncio.to_thread(conn.batches, [u for u in uids if u not in seen]):
                if stop.is_set():
                    break
                bodies = await asyncio.to_thread(conn.bodies, batch)
                for uid in batch:
                    if stop.is_set():
                        break
                    if uid not in bodies:
                        continue  # Expunged by someone else since the search.
                    folder = await self._handle(conn, uidvalidity, uid, bodies.pop(uid))
                    if folder is not None:
                        moves[folder].append(uid)
                        handled += folder != conn.quarantine or uid not in self._attempts
                # Moving a whole batch at once costs one command instead of fifty; a crash
                # before it only means those mails are found again and moved via `seen`.
                await self._flush(conn, moves)
        except StoreUnavailable:
            await self._flush(conn, moves)
            raise
        await self._flush(conn, moves)
        return handled

    async def _handle(self, conn: _Connection, uidvalidity: int, uid: int, raw: bytes) -> str | None:
        """Run the handler on one mail; return the folder to move it to, or None to keep it."""
        delivery = Delivery(
            source="imap", mailbox=self._settings.folder, uidvalidity=uidvalidity, uid=uid
        )
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
                return None
            # A poison mail must not block the queue forever; a human will look at it.
            self._attempts[key] = attempts
            log.warning("imap.poison_quarantined", uid=uid, uidvalidity=uidvalidity)
            return conn.quarantine
        self._attempts.pop(key, None)
        return conn.quarantine if outcome.quarantined else conn.processed

    async def _flush(self, conn: _Connection, moves: dict[str, list[int]]) -> None:
        for folder, uids in moves.items():
            if uids:
                await asyncio.to_thread(conn.move, uids, folder)
                log.debug("imap.moved", count=len(uids), folder=folder)
                for uid in uids:
                    self._attempts.pop((self._uidvalidity or 0, uid), None)
                uids.clear()

    async def _wait_for_mail(self, stop: asyncio.Event) -> None:
        """IDLE until the server reports something, else sleep for the poll interval."""
        conn = await self._connection()
        if not conn.use_idle:
            await _sleep(stop, self._settings.poll_seconds)
            return
        # Also end IDLE after the poll interval: a cheap sweep in case a notification was lost.
        deadline = time.monotonic() + min(IDLE_RENEW_SECONDS, self._settings.poll_seconds)
        await asyncio.to_thread(conn.idle_start)
        while not stop.is_set() and time.monotonic() < deadline:
            if await asyncio.to_thread(conn.idle_wait, IDLE_CHECK_SECONDS):
                break
        await asyncio.to_thread(conn.idle_done)

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch until `stop` is set, reconnecting with backoff after errors."""
        delay = BACKOFF_FIRST
        try:
            while not stop.is_set():
                try:
                    await self._drain(stop)
                    delay = BACKOFF_FIRST
                    if not stop.is_set():
                        await self._wait_for_mail(stop)
                    continue
                except StoreUnavailable:
                    # The connection is fine; keep it and retry once the database is back.
                    log.warning("imap.store_unavailable", retry_in=delay)
                    await _sleep(stop, delay)
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                except LoginError:
                    log.error(
                        f"IMAP login refused for user {self._settings.username}",
                        host=self._settings.host, retry_in=BACKOFF_MAX,
                    )  # fmt: skip
                    delay = BACKOFF_MAX
                except (OSError, IMAPClientError) as exc:
                    log.warning("imap.connection_error", error=repr(exc), retry_in=delay)
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


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, waking early when `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
