"""The IMAP fetcher against the rig's real Dovecot server."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import AsyncIterator, Callable

import pytest
from imapclient import IMAPClient
from pydantic import SecretStr
from rig.dovecot import DovecotServer, ImapAccount, free_port
from structlog.testing import capture_logs

from maildesk.config import ImapSettings, LimitsSettings
from maildesk.ingress.fetch import (
    FETCH_BATCH,
    FETCH_BATCH_BYTES,
    HEADER_CAP,
    ImapFetcher,
    _Connection,
    _unread_input,
    plan_downloads,
)
from maildesk.mail.message import Delivery, Outcome, StoreUnavailable

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


class Recorder:
    """A stand-in for the pipeline: records what it got and answers as `decide` says."""

    def __init__(self, decide: Callable[[bytes], str] = lambda raw: "ticket") -> None:
        self.calls: list[tuple[bytes, Delivery]] = []
        self.decide = decide
        self.arrived = threading.Event()

    def __call__(self, raw: bytes, delivery: Delivery) -> Outcome:
        self.calls.append((raw, delivery))
        self.arrived.set()
        return Outcome(inbound_id=len(self.calls), outcome=self.decide(raw))


def settings_for(account: ImapAccount, **changes: object) -> ImapSettings:
    settings = ImapSettings(
        enabled=True, host=account.host, port=account.port, tls="none",
        username=account.username, password=SecretStr(account.password), poll_seconds=3600,
    )  # fmt: skip
    return settings.model_copy(update=changes)


def never_seen(mailbox: str, uidvalidity: int, uids: list[int]) -> set[int]:
    return set()


def uidvalidity_of(account: ImapAccount, folder: str = "INBOX") -> int:
    with account.client() as imap:
        return int(imap.select_folder(folder, readonly=True)[b"UIDVALIDITY"])


def flags_of(account: ImapAccount, folder: str = "INBOX") -> list[tuple[bytes, ...]]:
    with account.client() as imap:
        imap.select_folder(folder, readonly=True)
        return list(imap.get_flags(imap.search("ALL")).values())


async def test_fetch_once_hands_over_exact_bytes_and_moves(imap_account: ImapAccount) -> None:
    mails = [make_mail(n) for n in range(3)]
    uids = [imap_account.append(raw) for raw in mails]
    recorder = Recorder()
    fetcher = ImapFetcher(settings_for(imap_account), recorder, never_seen, max_mail_bytes=MAX)
    try:
        assert await fetcher.fetch_once() == 3
    finally:
        await fetcher.close()
    uidvalidity = uidvalidity_of(imap_account)
    assert [raw for raw, _ in recorder.calls] == mails
    assert [d for _, d in recorder.calls] == [
        Delivery(source="imap", mailbox="INBOX", uidvalidity=uidvalidity, uid=uid) for uid in uids
    ]
    assert imap_account.uids("INBOX") == []
    assert imap_account.fetch_all(PROCESSED) == mails
    assert imap_account.uids(QUARANTINE) == []
    # BODY.PEEK and MOVE leave the mails unread for whoever looks at the folder later.
    assert all(b"\\Seen" not in flags for flags in flags_of(imap_account, PROCESSED))


async def test_quarantined_outcome_goes_to_quarantine(imap_account: ImapAccount) -> None:
    imap_account.append(make_mail(1))
    imap_account.append(make_mail(2))
    recorder = Recorder(lambda raw: "quarantined" if b"Test 2" in raw else "followup")
    fetcher = ImapFetcher(settings_for(imap_account), recorder, never_seen, max_mail_bytes=MAX)
    try:
        assert await fetcher.fetch_once() == 2
    finally:
        await fetcher.close()
    assert imap_account.fetch_all(PROCESSED) == [make_mail(1)]
    assert imap_account.fetch_all(QUARANTINE) == [make_mail(2)]
    assert imap_account.uids("INBOX") == []


async def test_store_unavailable_leaves_mail_unread(imap_account: ImapAccount) -> None:
    imap_account.append(make_mail(1))
    imap_account.append(make_mail(2))
    imap_account.append(make_mail(3))

    def decide(raw: bytes) -> str:
        if b"Test 2" in raw:
            raise StoreUnavailable("database down")
        return "ticket"

    recorder = Recorder(decide)
    fetcher = ImapFetcher(settings_for(imap_account), recorder, never_seen, max_mail_bytes=MAX)
    try:
        with pytest.raises(StoreUnavailable):
            await fetcher.fetch_once()
    finally:
        await fetcher.close()
    # The round stopped at mail 2: mail 1 committed and moved, mails 2 and 3 wait unread.
    assert len(recorder.calls) == 2
    assert imap_account.fetch_all(PROCESSED) == [make_mail(1)]
    assert imap_account.fetch_all("INBOX") == [make_mail(2), make_mail(3)]
    assert all(b"\\Seen" not in flags for flags in flags_of(imap_account))


async def test_already_stored_uid_is_moved_without_the_handler(imap_account: ImapAccount) -> None:
    stored = imap_account.append(make_mail(1))
    imap_account.append(make_mail(2))
    uidvalidity = uidvalidity_of(imap_account)
    asked: list[tuple[str, int, int]] = []

    def seen(mailbox: str, validity: int, uids: list[int]) -> set[int]:
        asked.extend((mailbox, validity, uid) for uid in uids)
        return {stored} if validity == uidvalidity and stored in uids else set()

    recorder = Recorder()
    fetcher = ImapFetcher(settings_for(imap_account), recorder, seen, max_mail_bytes=MAX)
    try:
        assert await fetcher.fetch_once() == 1
    finally:
        await fetcher.close()
    assert [raw for raw, _ in recorder.calls] == [make_mail(2)]
    assert ("INBOX", uidvalidity, stored) in asked
    assert imap_account.fetch_all(PROCESSED) == [make_mail(1), make_mail(2)]


async def test_poison_mail_is_quarantined_after_three_attempts(imap_account: ImapAccount) -> None:
    imap_account.append(make_mail(1))
    imap_account.append(make_mail(2))

    def decide(raw: bytes) -> str:
        if b"Test 1" in raw:
            raise RuntimeError("a bug in the pipeline")
        return "ticket"

    recorder = Recorder(decide)
    fetcher = ImapFetcher(settings_for(imap_account), recorder, never_seen, max_mail_bytes=MAX)
    try:
        with capture_logs() as logs:
            # The poison mail does not block the good one behind it.
            assert await fetcher.fetch_once() == 1
            assert imap_account.fetch_all("INBOX") == [make_mail(1)]
            assert await fetcher.fetch_once() == 0
            assert imap_account.fetch_all("INBOX") == [make_mail(1)]
            assert await fetcher.fetch_once() == 0
    finally:
        await fetcher.close()
    assert len(recorder.calls) == 4
    assert imap_account.uids("INBOX") == []
    assert imap_account.fetch_all(QUARANTINE) == [make_mail(1)]
    assert imap_account.fetch_all(PROCESSED) == [make_mail(2)]
    failures = [entry for entry in logs if entry["event"] == "imap.handler_failed"]
    assert [entry["attempt"] for entry in failures] == [1, 2, 3]
    assert "RuntimeError: a bug in the pipeline" in failures[0]["error"]
    assert all("numéro" not in repr(entry) for entry in logs)


async def test_copy_and_expunge_when_move_is_missing(imap_account: ImapAccount) -> None:
    class CopyingFetcher(ImapFetcher):
        asked = False

        def _can_move(self, client: IMAPClient) -> bool:
            CopyingFetcher.asked = True
            return False

    imap_account.append(make_mail(1))
    imap_account.append(make_mail(2))
    imap_account.append(make_mail(3))
    recorder = Recorder(lambda raw: "quarantined" if b"Test 2" in raw else "ticket")
    fetcher = CopyingFetcher(settings_for(imap_account), recorder, never_seen, max_mail_bytes=MAX)
    try:
        assert await fetcher.fetch_once() == 3
    finally:
        await fetcher.close()
    assert CopyingFetcher.asked
    assert imap_account.uids("INBOX") == []
    assert imap_account.fetch_all(PROCESSED) == [make_mail(1), make_mail(3)]
    assert imap_account.fetch_all(QUARANTINE) == [make_mail(2)]
    assert all(b"\\Deleted" not in flags for flags in flags_of(imap_account, PROCESSED))


async def test_run_with_idle_picks_up_new_mail_and_stops(imap_account: ImapAccount) -> None:
    imap_account.append(make_mail(1))
    recorder = Recorder()
    # poll_seconds is an hour, so only IDLE can bring the second mail in time.
    fetcher = ImapFetcher(
        settings_for(imap_account, idle=True), recorder, never_seen, max_mail_bytes=MAX
    )
    stop = asyncio.Event()
    task = asyncio.create_task(fetcher.run(stop))
    try:
        assert await asyncio.to_thread(recorder.arrived.wait, 10)
        recorder.arrived.clear()
        await asyncio.to_thread(imap_account.wait_for_count, PROCESSED, 1)
        # Append only once the fetcher is in IDLE, so that IDLE's notification is what wakes it.
        for _ in range(200):
            if fetcher._conn is not None and fetcher._conn.idling:
                break
            await asyncio.sleep(0.05)
        assert fetcher._conn is not None and fetcher._conn.idling
        await asyncio.to_thread(imap_account.append, make_mail(2))
        assert await asyncio.to_thread(recorder.arrived.wait, 10)
        await asyncio.to_thread(imap_account.wait_for_count, PROCESSED, 2)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert [raw for raw, _ in recorder.calls] == [make_mail(1), make_mail(2)]
    assert imap_account.uids("INBOX") == []


async def test_stop_finishes_the_mail_in_hand(imap_account: ImapAccount) -> None:
    for n in range(3):
        imap_account.append(make_mail(n))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def decide(raw: bytes) -> str:
        loop.call_soon_threadsafe(stop.set)  # A SIGTERM while the first mail is being stored.
        return "ticket"

    recorder = Recorder(decide)
    fetcher = ImapFetcher(settings_for(imap_account), recorder, never_seen, max_mail_bytes=MAX)
    await asyncio.wait_for(fetcher.run(stop), 10)
    assert len(recorder.calls) == 1
    assert imap_account.fetch_all(PROCESSED) == [make_mail(0)]
    assert imap_account.fetch_all("INBOX") == [make_mail(1), make_mail(2)]


def test_watched_folder_must_differ_from_targets(imap_account: ImapAccount) -> None:
    settings = settings_for(imap_account, processed_folder="INBOX")
    with pytest.raises(ValueError, match="must differ"):
        ImapFetcher(settings, Recorder(), never_seen, max_mail_bytes=MAX)


async def test_run_polls_without_idle(imap_account: ImapAccount) -> None:
    recorder = Recorder()
    settings = settings_for(imap_account, idle=False, poll_seconds=1)
    fetcher = ImapFetcher(settings, recorder, never_seen, max_mail_bytes=MAX)
    stop = asyncio.Event()
    task = asyncio.create_task(fetcher.run(stop))
    try:
        await asyncio.to_thread(imap_account.wait_for_count, PROCESSED, 0)
        await asyncio.to_thread(imap_account.append, make_mail(1))
        assert await asyncio.to_thread(recorder.arrived.wait, 10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert imap_account.fetch_all(PROCESSED) == [make_mail(1)]


async def test_login_refused_is_logged_and_stop_interrupts_backoff(
    imap_account: ImapAccount,
) -> None:
    settings = settings_for(imap_account, password=SecretStr("not-the-password"))
    fetcher = ImapFetcher(settings, Recorder(), never_seen, max_mail_bytes=MAX)
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(fetcher.run(stop))
        for _ in range(200):
            if any("login refused" in entry["event"] for entry in logs):
                break
            await asyncio.sleep(0.05)
        stop.set()
        # The backoff is 60 s; stop ends it at once.
        await asyncio.wait_for(task, 10)
    refused = [entry for entry in logs if "login refused" in entry["event"]]
    assert refused[0]["event"] == f"IMAP login refused for user {imap_account.username}"
    assert "not-the-password" not in repr(logs)


async def test_connection_errors_back_off_until_stopped(imap_account: ImapAccount) -> None:
    settings = settings_for(imap_account, port=free_port())  # Nobody listens there.
    fetcher = ImapFetcher(settings, Recorder(), never_seen, max_mail_bytes=MAX)
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(fetcher.run(stop))
        for _ in range(200):
            if any(entry["event"] == "imap.connection_error" for entry in logs):
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 10)
    errors = [entry for entry in logs if entry["event"] == "imap.connection_error"]
    assert errors and errors[0]["retry_in"] == 1.0


# Mail that lands while the fetcher goes from its last SEARCH into IDLE is the easiest to lose:
# the server announces it once, during SEARCH or together with the "+ idling" continuation,
# and never again. These tests append exactly then; poll_seconds is an hour, so a mail that
# the fetcher missed would sit in the folder and the test would time out.


async def wait_for_calls(recorder: Recorder, count: int, timeout: float = 10) -> bool:
    """Wait until the handler has been called `count` times; False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while len(recorder.calls) < count:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


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

    def patch(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        original = getattr(IMAPClient, name)

        def wrapper(client: IMAPClient, *args: object) -> object:
            conn = self.fetcher._conn
            ours = conn is not None and client is conn.client and args in ((), ("ALL",))
            if ours and self.armed.is_set():
                self.armed.clear()
                self.account.append(make_mail(99))
                if self.claim_recent:
                    # Another session with the folder open (a person's mail client, say) takes
                    # \Recent, so Dovecot's "* 1 RECENT" cannot wake the fetcher by luck.
                    with self.account.client() as other:
                        other.select_folder("INBOX")
                self.fired.set()
            return original(client, *args)

        monkeypatch.setattr(IMAPClient, name, wrapper)


def test_unread_input_sees_what_imaplib_read_ahead(imap_account: ImapAccount) -> None:
    # The fetcher relies on this look into imaplib's internals; None would mean it went blind.
    with imap_account.client() as imap:
        imap.select_folder("INBOX")
        imap.idle()
        assert _unread_input(imap) is False
        imap.idle_done()
        imap_account.append(make_mail(1))
        imap.idle()  # Answered with "+ idling" and "* 1 EXISTS".
        time.sleep(0.2)  # Wherever the EXISTS is by now, socket or buffer, it counts.
        assert _unread_input(imap) is True
        assert (1, b"EXISTS") in imap.idle_done()[1]


async def test_mail_appended_as_run_starts_is_handled(dovecot_server: DovecotServer) -> None:
    # The end-to-end situation: the mail comes while the fetcher connects, selects and searches.
    for _ in range(5):
        account = dovecot_server.add_user()
        recorder = Recorder()
        fetcher = ImapFetcher(
            settings_for(account, idle=True), recorder, never_seen, max_mail_bytes=MAX
        )
        async with running(fetcher):
            await asyncio.to_thread(account.append, make_mail(1))
            assert await wait_for_calls(recorder, 1), "the mail was not picked up"
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
    recorder = Recorder()
    fetcher = ImapFetcher(
        settings_for(imap_account, idle=True), recorder, never_seen, max_mail_bytes=MAX
    )
    injector = Injector(imap_account, fetcher, claim_recent=claim_recent)
    injector.patch(monkeypatch, moment)
    injector.armed.set()
    async with running(fetcher):
        assert await asyncio.to_thread(injector.fired.wait, 10)
        assert await wait_for_calls(recorder, 1), "the mail was not picked up"
    assert [raw for raw, _ in recorder.calls] == [make_mail(99)]


async def test_mails_appended_around_the_move_into_idle_are_all_handled(
    imap_account: ImapAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Count the fetcher's scans (SELECT + SEARCH), so that each mail is appended a random few
    # milliseconds after the scan that precedes IDLE has begun.
    scans = threading.Condition()
    scan_count = 0
    original_scan = _Connection.scan

    def scan(conn: _Connection) -> object:
        nonlocal scan_count
        with scans:
            scan_count += 1
            scans.notify_all()
        return original_scan(conn)

    def wait_for_scan(number: int) -> None:
        with scans:
            scans.wait_for(lambda: scan_count >= number, 5)

    monkeypatch.setattr(_Connection, "scan", scan)
    seen_at: list[int] = []
    recorder = Recorder()

    def handler(raw: bytes, delivery: Delivery) -> Outcome:
        seen_at.append(scan_count)
        return recorder(raw, delivery)

    fetcher = ImapFetcher(
        settings_for(imap_account, idle=True), handler, never_seen, max_mail_bytes=MAX
    )
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    with imap_account.client() as appender:
        async with running(fetcher):
            for n in range(25):
                # The scan after the last handled mail (or the very first) is the one before IDLE.
                target = seen_at[-1] + 1 if seen_at else 1
                await asyncio.to_thread(wait_for_scan, target)
                await asyncio.sleep(rng.uniform(0, 0.04))
                await asyncio.to_thread(appender.append, "INBOX", make_mail(n))
                assert await wait_for_calls(recorder, n + 1), f"mail {n} missed (seed {seed})"
    assert [raw for raw, _ in recorder.calls] == [make_mail(n) for n in range(25)]
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


async def test_oversized_mail_reaches_handler_as_headers_only(imap_account: ImapAccount) -> None:
    over = mail_of_size(LIMIT + 1, "Capture trop grande")
    at_limit = mail_of_size(LIMIT, "Capture juste assez petite")
    uids = [imap_account.append(raw) for raw in (over, at_limit, make_mail(1))]
    calls: list[tuple[bytes, Delivery]] = []

    def handler(raw: bytes, delivery: Delivery) -> Outcome:
        # As the pipeline does: a mail that came without its body is quarantined.
        calls.append((raw, delivery))
        outcome = "quarantined" if delivery.oversize is not None else "ticket"
        return Outcome(inbound_id=len(calls), outcome=outcome)

    fetcher = ImapFetcher(settings_for(imap_account), handler, never_seen, max_mail_bytes=LIMIT)
    try:
        with capture_logs() as logs:
            assert await fetcher.fetch_once() == 3
    finally:
        await fetcher.close()
    uidvalidity = uidvalidity_of(imap_account)
    delivery = Delivery(source="imap", mailbox="INBOX", uidvalidity=uidvalidity, uid=uids[0])
    assert calls == [
        (header_section(over), Delivery(**{**vars(delivery), "oversize": LIMIT + 1})),
        (at_limit, Delivery(**{**vars(delivery), "uid": uids[1]})),
        (make_mail(1), Delivery(**{**vars(delivery), "uid": uids[2]})),
    ]
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
    recorder = Recorder(lambda raw: "quarantined")
    fetcher = ImapFetcher(settings_for(imap_account), recorder, never_seen, max_mail_bytes=LIMIT)
    try:
        assert await fetcher.fetch_once() == 1
    finally:
        await fetcher.close()
    assert [(got, delivery.oversize) for got, delivery in recorder.calls] == [
        (raw[:HEADER_CAP], len(raw))
    ]
    assert imap_account.fetch_all(QUARANTINE) == [raw]


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
