"""The IMAP fetcher against the rig's real Dovecot server, with an in-memory intake."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from imapclient import IMAPClient
from pydantic import SecretStr
from rig.dovecot import DovecotServer, ImapAccount, free_port
from structlog.testing import capture_logs

from maildesk.config import ImapSettings, LimitsSettings
from maildesk.ingress import fetch
from maildesk.ingress.fetch import FETCH_BATCH, FETCH_BATCH_BYTES, ImapFetcher, plan_downloads
from maildesk.ingress.imap import HEADER_CAP, PIECE_BYTES, ImapConnection
from maildesk.mail.message import Delivery, StoreUnavailable
from maildesk.store.files import RawWriter
from maildesk.store.intake import Accepted, Arrival
from maildesk.store.models import RECEIVED

PROCESSED, QUARANTINE = "maildesk/processed", "maildesk/quarantine"
MAX = LimitsSettings().max_mail_bytes


def make_mail(n: int) -> bytes:
    """A small mail with CRLF line ends (as IMAP returns them) and 8-bit UTF-8 in the body."""
    return (
        f"From: Alice <alice@example.com>\r\nTo: support@desk.example\r\n"
        f"Subject: Test {n}\r\nMessage-ID: <m{n}@example.com>\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        f"\r\nBonjour, mail numéro {n}.\r\n"
    ).encode()


@dataclass
class Row:
    """A stored mail, as the store's InboundMail row keeps it."""

    raw: bytes
    delivery: Delivery
    state: str = RECEIVED


class MemoryIntake:
    """An in-memory Intake: stores arrivals as rows and files each as `decide(raw)` says.

    As in the store, the same bytes are one row, whose UIDVALIDITY and UID follow the latest
    delivery. Rows are filed at once, or with `held` only when the test calls file_held().
    `unavailable` store() calls are refused with StoreUnavailable before any is taken.
    """

    def __init__(
        self, decide: Callable[[bytes], str] = lambda raw: "ticket", *, held: bool = False
    ) -> None:
        self.decide = decide
        self.held = held
        self.rows: dict[int, Row] = {}
        self.batches: list[list[Arrival]] = []
        self.unavailable = 0
        self.outcome_calls = 0
        self.arrived = threading.Event()
        self._lock = threading.Lock()

    @property
    def arrivals(self) -> list[Arrival]:
        """Every arrival stored, in order."""
        return [arrival for batch in self.batches for arrival in batch]

    @property
    def raws(self) -> list[bytes]:
        """The raw bytes of every arrival stored, in order."""
        return [arrival.raw for arrival in self.arrivals]

    def store(self, arrivals: list[Arrival]) -> list[Accepted]:
        with self._lock:
            if self.unavailable:
                self.unavailable -= 1
                raise StoreUnavailable("database down")
            accepted = []
            for arrival in arrivals:
                row_id = next((i for i, r in self.rows.items() if r.raw == arrival.raw), None)
                if row_id is not None:
                    self.rows[row_id].delivery = arrival.delivery
                    accepted.append(Accepted(row_id, True))
                    continue
                row_id = len(self.rows) + 1
                row = self.rows[row_id] = Row(arrival.raw, arrival.delivery)
                if not self.held:
                    row.state = self.decide(arrival.raw)
                accepted.append(Accepted(row_id, False))
            self.batches.append(list(arrivals))
        self.arrived.set()
        return accepted

    def raw_writer(self) -> None:
        return None  # Large mails are fetched whole, so that their bytes are in the arrival.

    def checkpoint(self, mailbox: str, uidvalidity: int, uids: list[int]) -> dict[int, int]:
        with self._lock:
            return {
                row.delivery.uid: row_id
                for row_id, row in self.rows.items()
                if (row.delivery.mailbox, row.delivery.uidvalidity) == (mailbox, uidvalidity)
                and row.delivery.uid in uids
            }

    def outcomes(self, ids: list[int]) -> dict[int, str]:
        with self._lock:
            self.outcome_calls += 1
            return {row_id: self.rows[row_id].state for row_id in ids if row_id in self.rows}

    def file_held(self, which: Callable[[bytes], bool] = lambda raw: True) -> None:
        """File the received rows that `which` picks, as `decide` says."""
        with self._lock:
            for row in self.rows.values():
                if row.state == RECEIVED and which(row.raw):
                    row.state = self.decide(row.raw)

    def states(self) -> dict[bytes, str]:
        with self._lock:
            return {row.raw: row.state for row in self.rows.values()}


def settings_for(account: ImapAccount, **changes: object) -> ImapSettings:
    settings = ImapSettings(
        enabled=True, host=account.host, port=account.port, tls="none",
        username=account.username, password=SecretStr(account.password), poll_seconds=3600,
    )  # fmt: skip
    return settings.model_copy(update=changes)


def quarantine_if(*subjects: bytes) -> Callable[[bytes], str]:
    """A decision that quarantines mails whose bytes contain one of `subjects`."""
    return lambda raw: "quarantined" if any(s in raw for s in subjects) else "ticket"


def uidvalidity_of(account: ImapAccount, folder: str = "INBOX") -> int:
    with account.client() as imap:
        return int(imap.select_folder(folder, readonly=True)[b"UIDVALIDITY"])


def flags_of(account: ImapAccount, folder: str = "INBOX") -> list[tuple[bytes, ...]]:
    with account.client() as imap:
        imap.select_folder(folder, readonly=True)
        return list(imap.get_flags(imap.search("ALL")).values())


async def fetch_once(fetcher: ImapFetcher) -> int:
    """One pass of the fetcher, logged out afterwards."""
    try:
        return await fetcher.fetch_once()
    finally:
        await fetcher.close()


async def until(condition: Callable[[], bool], timeout: float = 10) -> bool:
    """Wait until `condition()` holds; False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_fetch_once_stores_exact_bytes_in_one_commit_and_moves(
    imap_account: ImapAccount,
) -> None:
    mails = [make_mail(n) for n in range(3)]
    uids = [imap_account.append(raw) for raw in mails]
    intake = MemoryIntake()
    fetcher = ImapFetcher(settings_for(imap_account), intake, max_mail_bytes=MAX)
    assert await fetch_once(fetcher) == 3
    uidvalidity = uidvalidity_of(imap_account)
    [batch] = intake.batches
    assert batch == [
        Arrival(raw, Delivery(source="imap", mailbox="INBOX", uidvalidity=uidvalidity, uid=uid))
        for raw, uid in zip(mails, uids, strict=True)
    ]
    assert imap_account.uids("INBOX") == []
    assert imap_account.fetch_all(PROCESSED) == mails
    assert imap_account.uids(QUARANTINE) == []
    # BODY.PEEK and MOVE leave the mails unread for whoever looks at the folder later.
    assert all(b"\\Seen" not in flags for flags in flags_of(imap_account, PROCESSED))


class FileKeepingIntake(MemoryIntake):
    """A MemoryIntake that has large mails written into raw files of a real store directory."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__()
        self.state_dir = state_dir

    def raw_writer(self) -> RawWriter:  # type: ignore[override]
        return RawWriter(self.state_dir)


def large_mail(size: int) -> bytes:
    """A mail of exactly `size` bytes, CRLF line ends, its body base64-like text."""
    head = make_mail(7).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAx\r\n"
    body = (line * (size // len(line) + 1))[: size - len(head) - 2] + b"\r\n"
    return head + body


@pytest.mark.parametrize("size", [2 * PIECE_BYTES, 2 * PIECE_BYTES + 17])
async def test_a_large_mail_is_fetched_in_pieces_into_its_raw_file(
    imap_account: ImapAccount, tmp_path: Path, size: int
) -> None:
    small, large = make_mail(1), large_mail(size)
    assert len(large) == size
    imap_account.append(small)
    imap_account.append(large)
    intake = FileKeepingIntake(tmp_path)
    fetcher = ImapFetcher(settings_for(imap_account), intake, max_mail_bytes=MAX)
    assert await fetch_once(fetcher) == 2
    [first, second] = intake.arrivals
    assert (first.raw, first.kept) == (small, None)  # A small mail comes in its FETCH batch.
    assert second.raw == b"" and second.kept is not None
    digest, raw_path, kept_size = second.kept
    assert (tmp_path / raw_path).read_bytes() == large
    assert (digest, kept_size) == (hashlib.sha256(large).hexdigest(), size)
    assert [p.name for p in (tmp_path / "raw").iterdir() if p.name.startswith(".tmp")] == []
    assert imap_account.fetch_all(PROCESSED) == [small, large]


async def test_quarantined_outcome_goes_to_quarantine(imap_account: ImapAccount) -> None:
    imap_account.append(make_mail(1))
    imap_account.append(make_mail(2))
    intake = MemoryIntake(quarantine_if(b"Test 2"))
    fetcher = ImapFetcher(settings_for(imap_account), intake, max_mail_bytes=MAX)
    assert await fetch_once(fetcher) == 2
    assert imap_account.fetch_all(PROCESSED) == [make_mail(1)]
    assert imap_account.fetch_all(QUARANTINE) == [make_mail(2)]
    assert imap_account.uids("INBOX") == []


async def test_missing_folders_are_created_and_an_existing_one_kept(
    imap_account: ImapAccount,
) -> None:
    imap_account.append(make_mail(1), folder="INBOX")
    with imap_account.client() as imap:
        imap.create_folder(QUARANTINE)
        imap.append(QUARANTINE, make_mail(0))
    fetcher = ImapFetcher(settings_for(imap_account), MemoryIntake(), max_mail_bytes=MAX)
    with capture_logs() as logs:
        assert await fetch_once(fetcher) == 1
    created = [entry["folder"] for entry in logs if entry["event"] == "imap.folder_created"]
    assert created == [PROCESSED]
    with imap_account.client() as imap:
        assert PROCESSED in [name for _, _, name in imap.list_sub_folders()]
    assert imap_account.fetch_all(PROCESSED) == [make_mail(1)]
    assert imap_account.fetch_all(QUARANTINE) == [make_mail(0)]


async def test_folders_are_named_with_the_servers_delimiter() -> None:
    server = DovecotServer(separator=".")
    server.start()
    try:
        account = server.add_user()
        account.append(make_mail(1))
        account.append(make_mail(2))
        # Settings name nested folders with "/"; this server's hierarchy delimiter is ".".
        fetcher = ImapFetcher(
            settings_for(account), MemoryIntake(quarantine_if(b"Test 2")), max_mail_bytes=MAX
        )
        assert await fetch_once(fetcher) == 2
        with account.client() as imap:
            names = {name for _, _, name in imap.list_folders()}
        assert {"maildesk.processed", "maildesk.quarantine"} <= names
        assert not any("/" in name for name in names)
        assert account.fetch_all("maildesk.processed") == [make_mail(1)]
        assert account.fetch_all("maildesk.quarantine") == [make_mail(2)]
    finally:
        server.stop()


async def test_refused_store_leaves_the_batch_unread_for_the_next_pass(
    imap_account: ImapAccount,
) -> None:
    mails = [make_mail(n) for n in range(3)]
    for raw in mails:
        imap_account.append(raw)
    intake = MemoryIntake()
    intake.unavailable = 1
    fetcher = ImapFetcher(settings_for(imap_account), intake, max_mail_bytes=MAX)
    with pytest.raises(StoreUnavailable):
        await fetch_once(fetcher)
    assert intake.batches == []
    assert imap_account.fetch_all("INBOX") == mails
    assert imap_account.uids(PROCESSED) == []
    assert all(b"\\Seen" not in flags for flags in flags_of(imap_account))
    # The next pass stores the whole batch and moves it.
    assert await fetch_once(fetcher) == 3
    assert intake.raws == mails
    assert imap_account.fetch_all(PROCESSED) == mails
    assert imap_account.uids("INBOX") == []


async def test_run_retries_a_refused_store_on_the_same_connection(
    imap_account: ImapAccount,
) -> None:
    mails = [make_mail(n) for n in range(3)]
    for raw in mails:
        imap_account.append(raw)
    intake = MemoryIntake()
    intake.unavailable = 2
    fetcher = ImapFetcher(settings_for(imap_account), intake, max_mail_bytes=MAX)
    with capture_logs() as logs:
        async with running(fetcher):
            await asyncio.to_thread(imap_account.wait_for_count, PROCESSED, 3)
    assert [e["retry_in"] for e in logs if e["event"] == "imap.store_unavailable"] == [1.0, 2.0]
    assert [e["event"] for e in logs].count("imap.connected") == 1
    assert intake.raws == mails
    assert imap_account.uids("INBOX") == []


async def test_stored_mail_stays_until_filed_then_moves_by_its_outcome(
    imap_account: ImapAccount,
) -> None:
    mails = [make_mail(n) for n in range(4)]
    for raw in mails:
        imap_account.append(raw)
    intake = MemoryIntake(quarantine_if(b"Test 1", b"Test 2"), held=True)
    fetcher = ImapFetcher(settings_for(imap_account), intake, max_mail_bytes=MAX)
    try:
        assert await fetcher.fetch_once() == 4
        assert imap_account.fetch_all("INBOX") == mails
        # Filed in part: only what is filed moves, and nothing is stored twice.
        intake.file_held(lambda raw: raw in (mails[0], mails[1]))
        assert await fetcher.fetch_once() == 0
        assert imap_account.fetch_all("INBOX") == mails[2:]
        assert imap_account.fetch_all(PROCESSED) == [mails[0]]
        assert imap_account.fetch_all(QUARANTINE) == [mails[1]]
        intake.file_held()
        assert await fetcher.fetch_once() == 0
    finally:
        await fetcher.close()
    assert len(intake.batches) == 1
    assert imap_account.uids("INBOX") == []
    assert imap_account.fetch_all(PROCESSED) == [mails[0], mails[3]]
    assert imap_account.fetch_all(QUARANTINE) == [mails[1], mails[2]]


async def test_run_waits_for_filing_and_moves_when_told(imap_account: ImapAccount) -> None:
    imap_account.append(make_mail(1))
    imap_account.append(make_mail(2))
    intake = MemoryIntake(quarantine_if(b"Test 2"), held=True)
    filed = asyncio.Event()
    fetcher = ImapFetcher(settings_for(imap_account), intake, max_mail_bytes=MAX, filed=filed)
    async with running(fetcher):
        assert await asyncio.to_thread(intake.arrived.wait, 10)
        # The fetcher has looked at the outcomes again since the mails were stored, and found
        # them still received: they are where they were.
        looked = intake.outcome_calls
        assert await until(lambda: intake.outcome_calls >= looked + 2)
        assert imap_account.fetch_all("INBOX") == [make_mail(1), make_mail(2)]
        intake.file_held()
        filed.set()
        await asyncio.to_thread(imap_account.wait_for_count, QUARANTINE, 1)
        await asyncio.to_thread(imap_account.wait_for_count, PROCESSED, 1)
    assert imap_account.fetch_all(PROCESSED) == [make_mail(1)]
    assert imap_account.fetch_all(QUARANTINE) == [make_mail(2)]
    assert imap_account.uids("INBOX") == [] and len(intake.batches) == 1


async def test_after_a_crash_stored_mails_move_by_their_recorded_outcome(
    imap_account: ImapAccount,
) -> None:
    mails = [make_mail(n) for n in range(5)]
    for raw in mails[:4]:
        imap_account.append(raw)
    intake = MemoryIntake(quarantine_if(b"Test 0", b"Test 2"), held=True)
    crashed = ImapFetcher(settings_for(imap_account), intake, max_mail_bytes=MAX)
    assert await crashed.fetch_once() == 4
    crashed._abandon()  # Gone without a goodbye, its pending mails not moved.
    # While no fetcher ran, the runner filed three of them, and a new mail came.
    intake.file_held(lambda raw: raw != mails[3])
    imap_account.append(mails[4])
    fetcher = ImapFetcher(settings_for(imap_account), intake, max_mail_bytes=MAX)
    try:
        with capture_logs() as logs:
            assert await fetcher.fetch_once() == 1
        assert [arrival.raw for arrival in intake.batches[1]] == [mails[4]]
        # Mail 3 was stored before the crash and mail 4 now, neither filed yet.
        assert imap_account.fetch_all("INBOX") == [mails[3], mails[4]]
        intake.file_held()
        assert await fetcher.fetch_once() == 0
    finally:
        await fetcher.close()
    assert len(intake.batches) == 2
    already = [entry["count"] for entry in logs if entry["event"] == "imap.already_stored"]
    assert already == [4]
    assert imap_account.uids("INBOX") == []
    assert imap_account.fetch_all(PROCESSED) == [mails[1], mails[3], mails[4]]
    assert imap_account.fetch_all(QUARANTINE) == [mails[0], mails[2]]


async def test_changed_uidvalidity_stores_nothing_twice(imap_account: ImapAccount) -> None:
    folder = "support"
    mails = [make_mail(n) for n in range(3)]
    with imap_account.client() as imap:
        imap.create_folder(folder)
        for raw in mails:
            imap.append(folder, raw)
    intake = MemoryIntake(quarantine_if(b"Test 1"), held=True)
    settings = settings_for(imap_account, folder=folder)
    fetcher = ImapFetcher(settings, intake, max_mail_bytes=MAX)
    try:
        assert await fetcher.fetch_once() == 3
        before = uidvalidity_of(imap_account, folder)
        # The folder is made anew, with the same mails in it and a new UIDVALIDITY.
        with imap_account.client() as imap:
            imap.delete_folder(folder)
            imap.create_folder(folder)
            for raw in mails:
                imap.append(folder, raw)
        after = uidvalidity_of(imap_account, folder)
        assert after != before
        intake.file_held()
        with capture_logs() as logs:
            # Downloaded again (their UIDs name nothing known), but found by their bytes.
            assert await fetcher.fetch_once() == 3
        assert await fetcher.fetch_once() == 0
    finally:
        await fetcher.close()
    assert [e["uidvalidity"] for e in logs if e["event"] == "imap.selected"] == [after]
    assert len(intake.rows) == 3
    assert {row.delivery.uidvalidity for row in intake.rows.values()} == {after}
    assert imap_account.uids(folder) == []
    assert imap_account.fetch_all(PROCESSED) == [mails[0], mails[2]]
    assert imap_account.fetch_all(QUARANTINE) == [mails[1]]


async def test_copy_and_expunge_when_move_is_missing(imap_account: ImapAccount) -> None:
    class CopyingFetcher(ImapFetcher):
        asked = False

        def _can_move(self, client: IMAPClient) -> bool:
            CopyingFetcher.asked = True
            return False

    imap_account.append(make_mail(1))
    imap_account.append(make_mail(2))
    imap_account.append(make_mail(3))
    intake = MemoryIntake(quarantine_if(b"Test 2"))
    fetcher = CopyingFetcher(settings_for(imap_account), intake, max_mail_bytes=MAX)
    assert await fetch_once(fetcher) == 3
    assert CopyingFetcher.asked
    assert imap_account.uids("INBOX") == []
    assert imap_account.fetch_all(PROCESSED) == [make_mail(1), make_mail(3)]
    assert imap_account.fetch_all(QUARANTINE) == [make_mail(2)]
    assert all(b"\\Deleted" not in flags for flags in flags_of(imap_account, PROCESSED))


async def test_run_with_idle_picks_up_new_mail_and_stops(imap_account: ImapAccount) -> None:
    imap_account.append(make_mail(1))
    intake = MemoryIntake()
    # poll_seconds is an hour, so only IDLE can bring the second mail in time.
    fetcher = ImapFetcher(settings_for(imap_account, idle=True), intake, max_mail_bytes=MAX)
    async with running(fetcher):
        assert await asyncio.to_thread(intake.arrived.wait, 10)
        await asyncio.to_thread(imap_account.wait_for_count, PROCESSED, 1)
        # Append only once the fetcher is in IDLE, so that IDLE's notification is what wakes it.
        assert await until(lambda: fetcher._conn is not None and fetcher._conn.idling)
        await asyncio.to_thread(imap_account.append, make_mail(2))
        await asyncio.to_thread(imap_account.wait_for_count, PROCESSED, 2)
    assert intake.raws == [make_mail(1), make_mail(2)]
    assert imap_account.uids("INBOX") == []


async def test_stop_finishes_the_batch_in_hand(
    imap_account: ImapAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "FETCH_BATCH", 2)
    mails = [make_mail(n) for n in range(5)]
    for raw in mails:
        imap_account.append(raw)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def decide(raw: bytes) -> str:
        loop.call_soon_threadsafe(stop.set)  # A SIGTERM while the first batch is being stored.
        return "ticket"

    intake = MemoryIntake(decide)
    fetcher = ImapFetcher(settings_for(imap_account), intake, max_mail_bytes=MAX)
    await asyncio.wait_for(fetcher.run(stop), 10)
    assert [[arrival.raw for arrival in batch] for batch in intake.batches] == [mails[:2]]
    assert imap_account.fetch_all(PROCESSED) == mails[:2]
    assert imap_account.fetch_all("INBOX") == mails[2:]


def test_watched_folder_must_differ_from_targets(imap_account: ImapAccount) -> None:
    settings = settings_for(imap_account, processed_folder="INBOX")
    with pytest.raises(ValueError, match="must differ"):
        ImapFetcher(settings, MemoryIntake(), max_mail_bytes=MAX)


async def test_run_polls_without_idle(imap_account: ImapAccount) -> None:
    intake = MemoryIntake()
    settings = settings_for(imap_account, idle=False, poll_seconds=1)
    fetcher = ImapFetcher(settings, intake, max_mail_bytes=MAX)
    async with running(fetcher):
        await asyncio.to_thread(imap_account.wait_for_count, PROCESSED, 0)
        await asyncio.to_thread(imap_account.append, make_mail(1))
        assert await asyncio.to_thread(intake.arrived.wait, 10)
        await asyncio.to_thread(imap_account.wait_for_count, PROCESSED, 1)
    assert imap_account.fetch_all(PROCESSED) == [make_mail(1)]


async def test_login_refused_is_logged_and_stop_interrupts_backoff(
    imap_account: ImapAccount,
) -> None:
    settings = settings_for(imap_account, password=SecretStr("not-the-password"))
    fetcher = ImapFetcher(settings, MemoryIntake(), max_mail_bytes=MAX)
    with capture_logs() as logs:
        async with running(fetcher):
            # The backoff is 60 s; stop ends it at once.
            assert await until(lambda: any("login refused" in e["event"] for e in logs))
    refused = [entry for entry in logs if "login refused" in entry["event"]]
    assert refused[0]["event"] == f"IMAP login refused for user {imap_account.username}"
    assert "not-the-password" not in repr(logs)


async def test_connection_errors_back_off_until_stopped(imap_account: ImapAccount) -> None:
    settings = settings_for(imap_account, port=free_port())  # Nobody listens there.
    fetcher = ImapFetcher(settings, MemoryIntake(), max_mail_bytes=MAX)
    with capture_logs() as logs:
        async with running(fetcher):
            assert await until(lambda: any(e["event"] == "imap.connection_error" for e in logs))
    errors = [entry for entry in logs if entry["event"] == "imap.connection_error"]
    assert errors[0]["retry_in"] == 1.0


async def test_server_restart_during_idle_is_ridden_out() -> None:
    server = DovecotServer()
    server.start()
    try:
        account = server.add_user()
        intake = MemoryIntake()
        fetcher = ImapFetcher(settings_for(account, idle=True), intake, max_mail_bytes=MAX)
        with capture_logs() as logs:
            async with running(fetcher):
                assert await until(lambda: server.idling_sessions() == 1)
                await asyncio.to_thread(server.restart)
                await asyncio.to_thread(account.append, make_mail(1))
                await asyncio.to_thread(account.wait_for_count, PROCESSED, 1, 15)
        assert intake.raws == [make_mail(1)]
        assert [e["event"] for e in logs].count("imap.connected") == 2
    finally:
        server.stop()


# Mail that lands while the fetcher goes from its last command into IDLE is the easiest to lose:
# the server announces it once, in the response of SEARCH or MOVE or together with the
# "+ idling" continuation, and never again. These tests append exactly then; poll_seconds is an
# hour, so a mail that the fetcher missed would sit in the folder and the test would time out.


async def wait_for_stored(intake: MemoryIntake, count: int, timeout: float = 10) -> bool:
    """Wait until `count` mails have been stored; False after `timeout` seconds."""
    return await until(lambda: len(intake.arrivals) >= count, timeout)


@contextlib.asynccontextmanager
async def running(fetcher: ImapFetcher) -> AsyncIterator[None]:
    """Run the fetcher in the background for the duration of the block."""
    stop = asyncio.Event()
    task = asyncio.create_task(fetcher.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


class Injector:
    """Patches an IMAPClient method so that, once armed, the fetcher's next call appends a mail."""

    def __init__(self, account: ImapAccount, fetcher: ImapFetcher, claim_recent: bool) -> None:
        self.armed = threading.Event()
        self.fired = threading.Event()
        self.account = account
        self.fetcher = fetcher
        self.claim_recent = claim_recent

    def patch(
        self, monkeypatch: pytest.MonkeyPatch, name: str, args: Sequence[tuple[object, ...]]
    ) -> None:
        """Arm on `name` called with one of `args`, or with any arguments when empty."""
        original = getattr(IMAPClient, name)

        def wrapper(client: IMAPClient, *given: object) -> object:
            conn = self.fetcher._conn
            ours = conn is not None and client is conn.client and (not args or given in args)
            if ours and self.armed.is_set():
                self.armed.clear()
                self.account.append(make_mail(99))
                if self.claim_recent:
                    # Another session with the folder open (a person's mail client, say) takes
                    # \Recent, so Dovecot's "* 1 RECENT" cannot wake the fetcher by luck.
                    with self.account.client() as other:
                        other.select_folder("INBOX")
                self.fired.set()
            return original(client, *given)

        monkeypatch.setattr(IMAPClient, name, wrapper)


async def test_mail_appended_as_run_starts_is_handled(dovecot_server: DovecotServer) -> None:
    # The end-to-end situation: the mail comes while the fetcher connects, selects and searches.
    for _ in range(5):
        account = dovecot_server.add_user()
        intake = MemoryIntake()
        fetcher = ImapFetcher(settings_for(account, idle=True), intake, max_mail_bytes=MAX)
        async with running(fetcher):
            await asyncio.to_thread(account.append, make_mail(1))
            assert await wait_for_stored(intake, 1), "the mail was not picked up"
        assert account.uids("INBOX") == []


# Between SELECT and SEARCH: the search misses the mail, and Dovecot announces it with an
# untagged EXISTS in the SEARCH response, which imapclient keeps to itself (another session
# claims \Recent, so that the IDLE cannot report it either).
# Between SEARCH and IDLE: Dovecot sends "+ idling" and the EXISTS in one packet, so imaplib
# reads both at once and the EXISTS waits in its buffer, where poll() cannot see it.
@pytest.mark.parametrize(("moment", "claim_recent"), [("search", True), ("idle", False)])
async def test_mail_announced_at_an_awkward_moment_is_handled(
    imap_account: ImapAccount, monkeypatch: pytest.MonkeyPatch, moment: str, claim_recent: bool
) -> None:
    intake = MemoryIntake()
    fetcher = ImapFetcher(settings_for(imap_account, idle=True), intake, max_mail_bytes=MAX)
    injector = Injector(imap_account, fetcher, claim_recent=claim_recent)
    injector.patch(monkeypatch, moment, [(), ("ALL",)])
    injector.armed.set()
    async with running(fetcher):
        assert await asyncio.to_thread(injector.fired.wait, 10)
        assert await wait_for_stored(intake, 1), "the mail was not picked up"
    assert intake.raws == [make_mail(99)]


async def test_mail_announced_during_the_move_of_filed_mail_is_handled(
    imap_account: ImapAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The runner files after the fetcher's last search: the MOVE of the filed mail is the last
    # command before IDLE, and Dovecot announces a mail that came meanwhile in its response.
    imap_account.append(make_mail(1))
    intake = MemoryIntake(held=True)
    filed = asyncio.Event()
    fetcher = ImapFetcher(
        settings_for(imap_account, idle=True), intake, max_mail_bytes=MAX, filed=filed
    )
    injector = Injector(imap_account, fetcher, claim_recent=True)
    injector.patch(monkeypatch, "move", [])
    async with running(fetcher):
        assert await wait_for_stored(intake, 1)
        injector.armed.set()
        intake.file_held()
        filed.set()
        assert await asyncio.to_thread(injector.fired.wait, 10)
        assert await wait_for_stored(intake, 2), "the mail was not picked up"
    assert intake.raws == [make_mail(1), make_mail(99)]


async def test_mails_appended_around_the_move_into_idle_are_all_handled(
    imap_account: ImapAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Count the fetcher's scans (SELECT + SEARCH), so that each mail is appended a random few
    # milliseconds after the scan that precedes IDLE has begun.
    scans = threading.Condition()
    scan_count = 0
    original_scan = ImapConnection.scan

    def scan(conn: ImapConnection) -> object:
        nonlocal scan_count
        with scans:
            scan_count += 1
            scans.notify_all()
        return original_scan(conn)

    def wait_for_scan(number: int) -> None:
        with scans:
            scans.wait_for(lambda: scan_count >= number, 5)

    monkeypatch.setattr(ImapConnection, "scan", scan)
    seen_at: list[int] = []

    class ScanRecordingIntake(MemoryIntake):
        def store(self, arrivals: list[Arrival]) -> list[Accepted]:
            seen_at.extend(scan_count for _ in arrivals)
            return super().store(arrivals)

    intake = ScanRecordingIntake()
    fetcher = ImapFetcher(settings_for(imap_account, idle=True), intake, max_mail_bytes=MAX)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    with imap_account.client() as appender:
        async with running(fetcher):
            for n in range(25):
                # The scan after the last stored mail (or the very first) is the one before IDLE.
                target = seen_at[-1] + 1 if seen_at else 1
                await asyncio.to_thread(wait_for_scan, target)
                await asyncio.sleep(rng.uniform(0, 0.04))
                await asyncio.to_thread(appender.append, "INBOX", make_mail(n))
                assert await wait_for_stored(intake, n + 1), f"mail {n} missed (seed {seed})"
    assert intake.raws == [make_mail(n) for n in range(25)]
    assert imap_account.uids("INBOX") == []


LIMIT = 64 * 1024  # a small max_mail_bytes, so that mails around it are quick to append


def mail_of_size(size: int, subject: str, header_lines: int = 0) -> bytes:
    """A mail with a base64 attachment, exactly `size` bytes long, CRLF line ends; with
    `header_lines` Received lines on top, as a mail that went round a loop carries.
    """
    received = "".join(
        f"Received: from relay{n}.customer.example (relay{n}.customer.example "
        f"[192.0.2.{n % 250 + 1}]) by mx.customer.example with ESMTPS id 4Zk{n:06d}; "
        "Fri, 14 Mar 2025 09:15:02 +0100\r\n"
        for n in range(header_lines)
    )
    head = (
        f"{received}Date: Fri, 14 Mar 2025 09:15:02 +0100\r\n"
        "From: Camille Durand <camille@customer.example>\r\nTo: support@desk.example\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{subject.replace(' ', '-')}@customer.example>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="------------b0undary"\r\n\r\n'
        "--------------b0undary\r\nContent-Type: text/plain; charset=UTF-8\r\n\r\n"
        "Voici la capture de l'erreur.\r\n\r\n--------------b0undary\r\n"
        'Content-Type: image/png; name="capture.png"\r\n'
        'Content-Disposition: attachment; filename="capture.png"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    tail = b"--------------b0undary--\r\n"
    line = b"iVBORw0KGgoAAAANSUhEUgAAB4AAAAQ4CAIAAABnsVYUAAAAA3NCSVQICAjb4U/gAAAgAElEQVR4\r\n"
    full, rest = divmod(size - len(head) - len(tail), len(line))
    # The last base64 line absorbs the remainder, so that every line still ends with CRLF.
    raw = head + line * (full - 1) + b"A" * (len(line) + rest - 2) + b"\r\n" + tail
    assert len(raw) == size
    return raw


def header_section(raw: bytes) -> bytes:
    return raw[: raw.index(b"\r\n\r\n") + 4]


async def test_oversized_mail_is_stored_as_headers_only(imap_account: ImapAccount) -> None:
    over = mail_of_size(LIMIT + 1, "Capture trop grande")
    at_limit = mail_of_size(LIMIT, "Capture juste assez petite")
    uids = [imap_account.append(raw) for raw in (over, at_limit, make_mail(1))]
    # As the runner does: a mail that came without its body is quarantined.
    intake = MemoryIntake(quarantine_if(b"Capture trop grande"))
    fetcher = ImapFetcher(settings_for(imap_account), intake, max_mail_bytes=LIMIT)
    with capture_logs() as logs:
        assert await fetch_once(fetcher) == 3
    uidvalidity = uidvalidity_of(imap_account)
    delivery = Delivery(source="imap", mailbox="INBOX", uidvalidity=uidvalidity, uid=uids[0])
    # The oversized mail is a commit of its own; the two others go together.
    assert intake.batches == [
        [Arrival(header_section(over), replace(delivery, oversize=LIMIT + 1))],
        [Arrival(at_limit, replace(delivery, uid=uids[1])),
         Arrival(make_mail(1), replace(delivery, uid=uids[2]))],
    ]  # fmt: skip
    # The oversized mail is kept whole and unread in quarantine, for a person to look at.
    assert imap_account.fetch_all(QUARANTINE) == [over]
    assert all(b"\\Seen" not in flags for flags in flags_of(imap_account, QUARANTINE))
    assert imap_account.fetch_all(PROCESSED) == [at_limit, make_mail(1)]
    assert imap_account.uids("INBOX") == []
    oversize = [entry for entry in logs if entry["event"] == "imap.oversize"]
    assert [(entry["uid"], entry["size"], entry["limit"]) for entry in oversize] == [
        (uids[0], LIMIT + 1, LIMIT)
    ]


async def test_header_section_of_an_oversized_mail_is_capped(imap_account: ImapAccount) -> None:
    # 3000 Received lines: a header section of about 440 KiB, over the 256 KiB cap.
    raw = mail_of_size(HEADER_CAP * 2, "Boucle de messagerie", header_lines=3000)
    assert len(header_section(raw)) > HEADER_CAP
    imap_account.append(raw)
    intake = MemoryIntake(lambda raw: "quarantined")
    fetcher = ImapFetcher(settings_for(imap_account), intake, max_mail_bytes=LIMIT)
    assert await fetch_once(fetcher) == 1
    assert [(a.raw, a.delivery.oversize) for a in intake.arrivals] == [(raw[:HEADER_CAP], len(raw))]
    assert imap_account.fetch_all(QUARANTINE) == [raw]


async def test_large_backlog_is_fetched_and_moved_in_batches(
    imap_account: ImapAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    mails = [make_mail(n) for n in range(FETCH_BATCH + 5)]
    with imap_account.client() as imap:
        for raw in mails:
            imap.append("INBOX", raw)
    moves: list[int] = []
    original_move = ImapConnection.move

    def move(conn: ImapConnection, uids: list[int], folder: str) -> None:
        moves.append(len(uids))
        original_move(conn, uids, folder)

    monkeypatch.setattr(ImapConnection, "move", move)
    intake = MemoryIntake()
    fetcher = ImapFetcher(settings_for(imap_account), intake, max_mail_bytes=MAX)
    assert await fetch_once(fetcher) == len(mails)
    assert [len(batch) for batch in intake.batches] == [FETCH_BATCH, 5]
    assert moves == [FETCH_BATCH, 5]
    assert imap_account.fetch_all(PROCESSED) == mails


def test_plan_downloads_groups_small_mails_and_isolates_big_ones() -> None:
    limit = 2 * FETCH_BATCH_BYTES
    sizes = {1: 900, 2: 900, 3: FETCH_BATCH_BYTES, 4: 900, 5: limit + 1, 6: 900, 8: limit}
    # UID 7 has no size: it was expunged between the search and the size fetch.
    assert plan_downloads([1, 2, 3, 4, 5, 6, 7, 8], sizes, limit) == [
        ([1, 2], False),
        ([3], False),  # It fills a batch's bytes on its own.
        ([4], False),
        ([5], True),  # Over the limit: headers only.
        ([6], False),
        ([8], False),  # At the limit: whole, and alone.
    ]
    many = list(range(1, FETCH_BATCH * 2 + 11))
    groups = plan_downloads(many, dict.fromkeys(many, 100), limit)
    assert [len(uids) for uids, _ in groups] == [FETCH_BATCH, FETCH_BATCH, 10]
    assert [uid for uids, _ in groups for uid in uids] == many
