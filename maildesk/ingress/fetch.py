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
import ssl
from collections.abc import Callable
from typing import Protocol

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from maildesk import metrics, oauth2
from maildesk.config import ImapSettings
from maildesk.ingress.imap import PIECE_BYTES, ImapConnection
from maildesk.logs import get_logger
from maildesk.mail.message import Delivery, StoreUnavailable
from maildesk.store.files import RawWriter
from maildesk.store.intake import Accepted, Arrival
from maildesk.store.models import RECEIVED

log = get_logger("fetch")

FETCH_BATCH = 50  # mails per FETCH or MOVE command
FETCH_BATCH_BYTES = 1024 * 1024  # bytes per FETCH of whole mails; a larger mail comes alone
# One instance reads a mailbox at a time: it renews its lease at least every
# LEASE_RENEW_SECONDS, the lease lasts LEASE_SECONDS, and an instance on standby asks again every
# LEASE_RETRY_SECONDS, so that another takes over within 30 s of the holder's death.
LEASE_SECONDS = 20.0
LEASE_RENEW_SECONDS = 8.0
LEASE_RETRY_SECONDS = 5.0
PENDING_WAIT_SECONDS = 1.0  # the longest wait for the runner before searching again
IDLE_RENEW_SECONDS = 25 * 60  # RFC 2177: servers may drop an IDLE after 30 minutes
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0
SOCKET_TIMEOUT = 60.0  # so that a dead network cannot hang a worker thread forever


class Intake(Protocol):
    """What the fetcher needs of the store; each method blocks, so call it in a worker thread."""

    def store(self, arrivals: list[Arrival]) -> list[Accepted]:
        """Make mails durable in one commit (StoreUnavailable when the database refused)."""

    def checkpoint(self, mailbox: str, uidvalidity: int, uids: list[int]) -> dict[int, int]:
        """Which of these UIDs are stored already, each with its row id."""

    def outcomes(self, ids: list[int]) -> dict[int, str]:
        """Each row's state: "received" until filed, then its outcome."""

    def raw_writer(self) -> RawWriter | None:
        """A new raw file to write a large mail into as it is fetched; None: fetch it whole."""


class ImapFetcher:
    """Read mails from an IMAP folder into intake, and move each away once it is filed.

    A batch of mails is FETCHed and stored in one commit; each then waits in `_pending` until
    the intake runner has filed it, and goes to the processed or the quarantine folder by what
    became of it. A crash at any point loses nothing and misfiles nothing: the mails still in
    the folder are looked up in the store's checkpoint and moved by their recorded outcome.
    """

    def __init__(
        self, settings: ImapSettings, intake: Intake, *, max_mail_bytes: int,
        filed: asyncio.Event | None = None, lease: Callable[[], bool] | None = None,
    ) -> None:  # fmt: skip
        """Remember the settings, the store's side and the largest mail to download whole;
        `filed` is set whenever the runner has filed mail; `lease`, when instances share the
        mailbox, takes or renews this instance's lease on it (False: another holds it).
        Connects lazily.
        """
        if not settings.username or (settings.auth == "password" and settings.password is None):
            raise ValueError("IMAP needs a username and a password")
        if settings.folder in (settings.processed_folder, settings.quarantine_folder):
            # Moving a mail into the folder it came from would loop forever.
            raise ValueError("the IMAP folder must differ from the processed and quarantine ones")
        self._settings = settings
        self._intake = intake
        self._max_mail_bytes = max_mail_bytes
        self._filed = filed
        self._lease = lease
        self._standing_by = False
        self._conn: ImapConnection | None = None
        # UIDs (of the current UIDVALIDITY) stored but not yet filed, with their row ids.
        self._pending: dict[int, int] = {}
        self._uidvalidity: int | None = None

    def _can_move(self, client: IMAPClient) -> bool:
        """Whether to use MOVE; a subclass may say no to exercise COPY + EXPUNGE."""
        return bool(client.has_capability("MOVE"))

    def _open(self) -> ImapConnection:
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
            user = settings.username
            assert user is not None
            if settings.auth == "xoauth2":
                try:
                    oauth2.imap_login(client, user, oauth2.source_for(settings))
                except oauth2.TokenError as exc:
                    # Refused: the operator must fix the credentials, as for a bad password;
                    # unreachable: retried with backoff, as for a server that is down.
                    log.error("imap.oauth2_failed", user=user, reason=str(exc))
                    raise (LoginError if exc.refused else ConnectionError)(str(exc)) from None
            else:
                assert settings.password is not None
                client.login(user, settings.password.get_secret_value())
            conn = ImapConnection(client, settings)
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

    async def _connection(self) -> ImapConnection:
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
        stored = 0
        tried: set[tuple[int, int]] = set()
        # Search again after each pass: mails that arrived meanwhile were announced during
        # other commands, so IDLE would not report them.
        while not stop.is_set():
            uidvalidity, uids, more = await asyncio.to_thread(conn.scan)
            if uidvalidity != self._uidvalidity:
                # UIDs of another UIDVALIDITY name other mails: what was pending is found
                # again, under its new UIDs, through the checkpoint and the SHA-256.
                log.info("imap.selected", folder=conn.folder, uidvalidity=uidvalidity)
                self._uidvalidity = uidvalidity
                self._pending.clear()
            todo = [uid for uid in uids if (uidvalidity, uid) not in tried]
            if not todo:
                if more:
                    continue  # Mail came during the search itself: look again.
                # The moves come last, and a search follows them: mail announced in a MOVE's
                # response would not be announced again by the IDLE that comes next.
                if not await self._move_filed(conn):
                    break
                continue
            tried.update((uidvalidity, uid) for uid in todo)
            stored += await self._process(conn, uidvalidity, todo, stop)
        if stop.is_set():
            await self._move_filed(conn)
        return stored

    async def _process(
        self, conn: ImapConnection, uidvalidity: int, uids: list[int], stop: asyncio.Event
    ) -> int:
        mailbox = self._settings.folder
        known = await asyncio.to_thread(self._intake.checkpoint, mailbox, uidvalidity, uids)
        if known:
            # Stored before (a crash, or a restart before the runner filed them): they are
            # only moved, once filed, by what became of them.
            log.info("imap.already_stored", count=len(known), uidvalidity=uidvalidity)
            self._pending.update(known)
        fresh = [uid for uid in uids if uid not in known]
        stored = 0
        for start in range(0, len(fresh), FETCH_BATCH):
            if stop.is_set():
                break
            chunk = fresh[start : start + FETCH_BATCH]
            sizes = await asyncio.to_thread(conn.sizes, chunk)
            for group, headers_only in plan_downloads(chunk, sizes, self._max_mail_bytes):
                if stop.is_set():
                    break
                [first, *others] = group
                if not headers_only and not others and sizes[first] > PIECE_BYTES:
                    writer = await asyncio.to_thread(self._intake.raw_writer)
                    if writer is not None:
                        stored += await self._download_in_pieces(conn, uidvalidity, first, writer)
                        continue
                oversizes = {uid: sizes[uid] for uid in group} if headers_only else {}
                stored += await self._download(conn, uidvalidity, group, oversizes)
            # Moving a whole batch at once costs one command instead of fifty.
            await self._move_filed(conn)
        return stored

    async def _download(
        self, conn: ImapConnection, uidvalidity: int, uids: list[int], oversizes: dict[int, int]
    ) -> int:
        """Fetch one group (whole mails, or only the headers of those in `oversizes`, UID to
        declared size) and store it in one commit; returns how many mails were stored.
        """
        fetch = conn.headers if oversizes else conn.bodies
        raws = await asyncio.to_thread(fetch, uids)
        arrivals: list[Arrival] = []
        order: list[int] = []
        for uid in uids:
            if uid not in raws:
                continue  # Expunged by someone else since the search.
            oversize = oversizes.get(uid)
            if oversize is not None:
                log.info(
                    "imap.oversize", uid=uid, uidvalidity=uidvalidity, size=oversize,
                    limit=self._max_mail_bytes,
                )  # fmt: skip
            delivery = Delivery(
                source="imap", mailbox=self._settings.folder, uidvalidity=uidvalidity, uid=uid,
                oversize=oversize,
            )  # fmt: skip
            arrivals.append(Arrival(raws.pop(uid), delivery))
            order.append(uid)
        return await self._store(arrivals, order)

    async def _store(self, arrivals: list[Arrival], order: list[int]) -> int:
        """Store fetched mails in one commit, and note them as pending; how many were stored."""
        if not arrivals:
            return 0
        accepted = await asyncio.to_thread(self._intake.store, arrivals)
        metrics.MAILS_STORED.labels("imap").inc(len(arrivals))
        self._pending.update(
            (uid, item.inbound_id) for uid, item in zip(order, accepted, strict=True)
        )
        return len(arrivals)

    async def _download_in_pieces(
        self, conn: ImapConnection, uidvalidity: int, uid: int, writer: RawWriter
    ) -> int:
        """Fetch one large mail piece by piece into its raw file, then store it; 1 or 0."""

        def fetch() -> tuple[str, str, int] | None:
            with writer:
                if not conn.body_in_pieces(uid, writer.write):
                    return None
                return (*writer.keep(), writer.size)

        kept = await asyncio.to_thread(fetch)
        if kept is None:
            return 0
        delivery = Delivery(
            source="imap", mailbox=self._settings.folder, uidvalidity=uidvalidity, uid=uid
        )
        return await self._store([Arrival(b"", delivery, kept)], [uid])

    async def _move_filed(self, conn: ImapConnection) -> int:
        """Move the pending mails that the runner has filed, by their outcome; how many."""
        if not self._pending:
            return 0
        if self._filed is not None:
            # Cleared before the look-up, so that a filing committed meanwhile sets it again.
            self._filed.clear()
        states = await asyncio.to_thread(
            self._intake.outcomes, sorted(set(self._pending.values()))
        )
        moves: dict[str, list[int]] = {conn.processed: [], conn.quarantine: []}
        for uid, row_id in list(self._pending.items()):
            state = states.get(row_id, "gone")
            if state == RECEIVED:
                continue
            # A row that is gone was erased; its copy here is filed like any other.
            moves[conn.quarantine if state == "quarantined" else conn.processed].append(uid)
            del self._pending[uid]
        moved = sum(len(uids) for uids in moves.values())
        await self._flush(conn, moves)
        return moved

    async def _flush(self, conn: ImapConnection, moves: dict[str, list[int]]) -> None:
        for folder, uids in moves.items():
            # Slices keep the command line short when many stored mails wait to be moved.
            for start in range(0, len(uids), FETCH_BATCH):
                chunk = sorted(uids[start : start + FETCH_BATCH])
                await asyncio.to_thread(conn.move, chunk, folder)
            if uids:
                log.debug("imap.moved", count=len(uids), folder=folder)
            uids.clear()

    async def _wait_for_mail(self, stop: asyncio.Event) -> None:
        """IDLE until the server reports something, else sleep for the poll interval."""
        conn = await self._connection()
        if stop.is_set():
            return
        if self._pending:
            # Mails wait to be filed: their moves come first, and the next search will find
            # whatever arrived meanwhile.
            events = [stop] if self._filed is None else [stop, self._filed]
            await _wait_any(events, PENDING_WAIT_SECONDS)
            return
        if conn.use_idle:
            # IDLE also ends after the poll interval: a cheap sweep in case news got lost; and
            # often enough to renew the mailbox's lease when several instances share it.
            seconds: float = min(IDLE_RENEW_SECONDS, self._settings.poll_seconds)
            if self._lease is not None:
                seconds = min(seconds, LEASE_RENEW_SECONDS)
            await asyncio.to_thread(conn.idle, stop, seconds)
        else:
            poll: float = self._settings.poll_seconds
            await _sleep(stop, poll if self._lease is None else min(poll, LEASE_RENEW_SECONDS))

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch until `stop` is set, reconnecting with backoff after errors."""
        delay = BACKOFF_FIRST
        try:
            while not stop.is_set():
                try:
                    if not await self._hold_mailbox(stop):
                        continue
                    await self._drain(stop)
                    delay = BACKOFF_FIRST
                    await self._wait_for_mail(stop)
                    continue
                except StoreUnavailable:
                    # The connection is fine: keep it, and retry once the database is back.
                    log.warning("imap.store_unavailable", retry_in=delay)
                except LoginError:
                    metrics.IMAP_RECONNECTS.inc()
                    delay = BACKOFF_MAX
                    user = self._settings.username
                    log.error(f"IMAP login refused for user {user}", retry_in=delay)
                except (OSError, IMAPClientError) as exc:
                    metrics.IMAP_RECONNECTS.inc()
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

    async def _hold_mailbox(self, stop: asyncio.Event) -> bool:
        """Whether this instance may read the mailbox now; while another instance holds it,
        stay disconnected and ask again every LEASE_RETRY_SECONDS."""
        if self._lease is None:
            return True
        if await asyncio.to_thread(self._lease):
            if self._standing_by:
                log.info("imap.lease_taken", folder=self._settings.folder)
                self._standing_by = False
            return True
        if not self._standing_by:
            log.info("imap.standby", folder=self._settings.folder,
                     reason="another instance reads this mailbox")  # fmt: skip
            self._standing_by = True
        await self.close()
        await _sleep(stop, LEASE_RETRY_SECONDS)
        return False

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


async def _wait_any(events: list[asyncio.Event], timeout: float) -> None:
    """Return when any of `events` is set or after `timeout` seconds."""
    tasks = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, waking early when `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
