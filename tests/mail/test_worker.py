"""Tests for the parse worker: mails parsed in a child process, within bounds, stoppable at once.

`hostile_parse` is the child's parse function in most tests: what a mail's first line says, it
does (spin, exit, abort, hoard memory, block), and any other mail goes to parse_mail, so that
one worker can show both a bound broken and the next mail parsed. Nothing here sleeps or times
the parser: waits that could hang have generous timeouts, and the budgets are kept small.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import pickle
import random
import select
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from maildesk.mail.limits import POLICY, ParseLimits
from maildesk.mail.message import MalformedMail, ParsedAttachment, ParsedMail, SpooledFile
from maildesk.mail.parse import parse_mail
from maildesk.mail.worker import ParseWorker, WorkerStopped, dump_result, load_result

DATA = Path(__file__).parent.parent / "data"
SAMPLES = sorted(path.name for path in DATA.glob("*.eml"))
HOARD_TARGET = 160 * 2**20  # The resident memory that `hostile_parse` grows the child to.
_HOARD: list[bytes] = []  # What the child keeps: a leak that recycling must give back.

pytestmark = pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux")


def _resident() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hostile_parse(raw: bytes, limits: ParseLimits) -> ParsedMail:
    """The child's parse function for tests: act as the mail's first line says, or parse it."""
    command, _, argument = raw.partition(b"\n")[0].partition(b" ")
    argument = argument.strip()
    if command == b"X-Test-Spin:":
        if argument:  # A FIFO to tell the test that the parse has begun.
            with open(argument, "wb") as fifo:
                fifo.write(b"!")
        while True:
            pass
    if command == b"X-Test-Exit:":
        os._exit(3)
    if command == b"X-Test-Abort:":
        os.abort()
    if command == b"X-Test-Allocate:":
        _HOARD.append(b"x" * (2 * 2**30))
    if command == b"X-Test-Wrapped:":
        try:
            b"x" * (2 * 2**30)
        except MemoryError as exc:  # As parse_mail wraps what the email package raised.
            raise MalformedMail("cannot parse mail (MemoryError: )") from exc
    if command == b"X-Test-Block:":
        threading.Event().wait()
    if command == b"X-Test-Raise:":
        raise ValueError("a bug in the parser")
    if command == b"X-Test-Escape:":
        # A child gone wrong naming a file of the daemon's as the spool file of an attachment.
        mail = parse_mail(raw.partition(b"\n")[2], limits)
        escaped = SpooledFile(path=argument.decode(), size=1, sha256="0" * 64)
        attachment = ParsedAttachment("x.pdf", "application/pdf", b"", False, None, escaped)
        return dataclasses.replace(mail, attachments=[attachment])
    if command == b"X-Test-Hoard:":
        # Written to, so resident: the child ends 8 MiB over the target.
        _HOARD.append(b"\x01" * max(0, HOARD_TARGET + 8 * 2**20 - _resident()))
    return parse_mail(raw, limits)


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def command(name: str, argument: bytes = b"") -> bytes:
    """A mail whose first line tells hostile_parse what to do; the rest is a real mail."""
    return b"X-Test-" + name.encode() + b": " + argument + b"\r\n" + sample("gmail_en_reply.eml")


def big_mail(size: int) -> bytes:
    """A mail of about `size` bytes: a short text and a PDF, as Thunderbird sends them."""
    pdf = b"%PDF-1.7\n" + random.Random(size).randbytes(size * 3 // 4 - 4096)
    body = base64.encodebytes(pdf).replace(b"\n", b"\r\n")
    return (
        b"Return-Path: <claire.dupont@client.example>\r\n"
        b"Received: from smtp.client.example (smtp.client.example [198.51.100.25])\r\n"
        b"\tby mx.desk.example (Postfix) with ESMTPS id 4Q20KdW1s2z9sZ\r\n"
        b"\tfor <support@desk.example>; Fri, 27 Nov 2026 11:52:40 +0100 (CET)\r\n"
        b'Content-Type: multipart/mixed; boundary="------------q8Zc3vN1mT6yB0xR5wE2hL7p"\r\n'
        b"Message-ID: <7c1e9a52-3b4d-4f60-8e21-d5a6b7c8e9f0@client.example>\r\n"
        b"Date: Fri, 27 Nov 2026 11:52:37 +0100\r\n"
        b"MIME-Version: 1.0\r\n"
        b"User-Agent: Mozilla Thunderbird\r\n"
        b"To: support@desk.example\r\n"
        b"From: Claire Dupont <claire.dupont@client.example>\r\n"
        b"Subject: Export complet des factures 2026\r\n\r\n"
        b"This is a multi-part message in MIME format.\r\n"
        b"--------------q8Zc3vN1mT6yB0xR5wE2hL7p\r\n"
        b"Content-Type: text/plain; charset=UTF-8; format=flowed\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n\r\n"
        b"Bonjour,\r\n\r\nVoici l'export complet, comme convenu.\r\n\r\nClaire\r\n\r\n"
        b"--------------q8Zc3vN1mT6yB0xR5wE2hL7p\r\n"
        b'Content-Type: application/pdf; name="factures-2026.pdf"\r\n'
        b'Content-Disposition: attachment; filename="factures-2026.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + body
        + b"\r\n--------------q8Zc3vN1mT6yB0xR5wE2hL7p--\r\n"
    )


def assert_same_mail(got: ParsedMail, expected: ParsedMail) -> None:
    """Compare two parses field by field, the EmailMessage by its bytes and its policy."""
    for field in dataclasses.fields(ParsedMail):
        if field.name != "message":
            assert getattr(got, field.name) == getattr(expected, field.name), field.name
    assert got.message.as_bytes() == expected.message.as_bytes()
    assert [part.get_content_type() for part in got.message.walk()] == [
        part.get_content_type() for part in expected.message.walk()
    ]
    assert got.message.policy is POLICY


def reason(worker: ParseWorker, raw: bytes) -> str:
    with pytest.raises(MalformedMail) as caught:
        worker.parse(raw)
    return caught.value.reason


@pytest.fixture(scope="module")
def worker() -> Iterator[ParseWorker]:
    """One worker for the tests that leave its child well."""
    with ParseWorker(processes=2) as shared:
        yield shared


@pytest.fixture
def hostile() -> Iterator[ParseWorker]:
    with ParseWorker(
        cpu_seconds=0.5, wall_seconds=60, max_rss_bytes=256 * 2**20, parse_function=hostile_parse
    ) as hostile_worker:
        yield hostile_worker


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_parses_as_in_process(worker: ParseWorker, name: str) -> None:
    raw = sample(name)
    try:
        expected = parse_mail(raw)
    except MalformedMail as refused:
        assert reason(worker, raw) == refused.reason
    else:
        assert_same_mail(worker.parse(raw), expected)


def test_malformed_mail_keeps_its_reason() -> None:
    with ParseWorker() as refusing:
        assert reason(refusing, sample("garbage.eml")) == "no headers: not an email"
        assert reason(refusing, sample("malformed_no_from.eml")) == "no From header"
        assert reason(refusing, b"\r\n \r\n") == "empty input"
        assert (refusing.started, refusing.recycled) == (1, 0)  # A bad mail harms no child.


def test_limits_reach_the_child() -> None:
    raw = sample("gmail_en_reply.eml")
    with ParseWorker(limits=ParseLimits(max_mail_bytes=1000)) as small:
        assert reason(small, raw) == f"too large ({len(raw)} bytes, the limit is 1000)"


def test_result_round_trips_through_pickle_with_its_policy() -> None:
    mail = parse_mail(sample("forwarded_rfc822.eml"))
    copy = load_result(dump_result(mail))
    assert_same_mail(copy, mail)
    assert copy.message.get_payload()[1].policy is POLICY


def test_result_naming_other_code_is_refused() -> None:
    with pytest.raises(pickle.UnpicklingError, match=r"may not hold posix\.system"):
        load_result(pickle.dumps(os.system))


def test_budget_overrun_is_quarantined_and_the_next_mail_parses(hostile: ParseWorker) -> None:
    assert reason(hostile, command("Spin")) == "parsing took over 0.5 s of CPU"
    assert hostile.parse(sample("gmail_en_reply.eml")).subject.startswith("Re:")
    assert hostile.started == 2


def test_crashes_are_quarantined_and_the_next_mail_parses(hostile: ParseWorker) -> None:
    assert reason(hostile, command("Exit")) == "parser crashed: exit code 3"
    assert reason(hostile, command("Abort")) == "parser crashed: killed by SIGABRT"
    assert reason(hostile, command("Raise")) == "parser crashed: ValueError: a bug in the parser"
    assert hostile.parse(sample("gmail_en_reply.eml")).from_address.endswith(".example")
    assert (hostile.started, hostile.recycled) == (4, 3)


def test_memory_bomb_is_quarantined_and_the_next_mail_parses(hostile: ParseWorker) -> None:
    assert reason(hostile, command("Allocate")) == "parsing needed more than 256 MiB"
    # parse_mail turns a MemoryError into MalformedMail: the reason is still the bound.
    assert reason(hostile, command("Wrapped")) == "parsing needed more than 256 MiB"
    assert hostile.parse(sample("gmail_en_reply.eml")).from_address.endswith(".example")
    assert (hostile.started, hostile.recycled) == (3, 2)


def test_mail_too_big_to_read_is_a_memory_bomb_too() -> None:
    with ParseWorker(max_rss_bytes=4 * 2**20) as tiny:
        assert reason(tiny, big_mail(20_000_000)) == "parsing needed more than 4 MiB"
        assert tiny.parse(sample("gmail_en_reply.eml")).subject.startswith("Re:")
        # The second child is ended too: 20 MB resident, it is over max_rss_bytes between mails.
        assert (tiny.started, tiny.recycled, tiny.pids) == (2, 2, [])


def test_blocked_parse_ends_at_the_wall_clock_deadline() -> None:
    with ParseWorker(cpu_seconds=30, wall_seconds=1, parse_function=hostile_parse) as blocking:
        assert reason(blocking, command("Block")) == "parsing took over 1 s of real time"
        assert blocking.pids == []
        assert blocking.parse(sample("gmail_en_reply.eml")).subject.startswith("Re:")


def test_stop_ends_a_parse_in_progress(tmp_path: Path) -> None:
    fifo = tmp_path / "begun"
    os.mkfifo(fifo)
    spinning = ParseWorker(cpu_seconds=60, parse_function=hostile_parse)
    outcome: list[BaseException] = []

    def parse() -> None:
        try:
            spinning.parse(command("Spin", str(fifo).encode()))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=parse)
    thread.start()
    begun = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert select.select([begun], [], [], 60)[0] == [begun]  # Until the child spins.
        assert os.read(begun, 1) == b"!"
    finally:
        os.close(begun)
    spinning.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], WorkerStopped)
    assert spinning.pids == []
    with pytest.raises(WorkerStopped):
        spinning.parse(sample("gmail_en_reply.eml"))
    spinning.stop()  # Idempotent.
    spinning.close()


def test_sigterm_to_the_unit_does_not_kill_the_child(worker: ParseWorker) -> None:
    worker.parse(sample("gmail_en_reply.eml"))
    started, pids = worker.started, worker.pids
    for pid in pids:
        os.kill(pid, signal.SIGTERM)  # As systemd sends it to every process of the unit.
    for _ in pids:
        assert worker.parse(sample("gmail_en_reply.eml")).subject.startswith("Re:")
    assert (worker.started, worker.pids) == (started, pids)


def test_concurrent_parses_get_their_own_results(worker: ParseWorker) -> None:
    names = [name for name in SAMPLES if "malformed" not in name and "garbage" not in name] * 3
    expected = {name: parse_mail(sample(name)) for name in names}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda name: worker.parse(sample(name)), names))
    assert len(results) == len(names)
    for name, got in zip(names, results, strict=True):
        assert_same_mail(got, expected[name])
    assert len(worker.pids) <= 2


def test_child_is_recycled_after_a_big_mail() -> None:
    raw = big_mail(20_000_000)
    expected = parse_mail(raw)
    assert expected.attachments[0].content_type == "application/pdf"
    with ParseWorker(recycle_after_bytes=16 * 2**20) as recycling:
        first = recycling.parse(sample("gmail_en_reply.eml"))
        assert first.subject.startswith("Re:")
        pid = recycling.pids
        assert_same_mail(recycling.parse(raw), expected)
        assert (recycling.recycled, recycling.pids) == (1, [])
        recycling.parse(sample("gmail_en_reply.eml"))
        assert recycling.started == 2
        assert recycling.pids != pid


def test_child_is_recycled_when_its_memory_grew() -> None:
    with ParseWorker(max_rss_bytes=HOARD_TARGET, parse_function=hostile_parse) as hoarding:
        hoarding.parse(sample("gmail_en_reply.eml"))
        assert hoarding.recycled == 0
        mail = hoarding.parse(command("Hoard"))
        assert mail.subject.startswith("Re:")
        assert (hoarding.recycled, hoarding.pids) == (1, [])


def test_a_large_mail_is_read_from_its_file_by_the_child_which_spools_its_attachment(
    tmp_path: Path,
) -> None:
    raw = big_mail(3 * 2**20)
    (stored := tmp_path / "mail.eml").write_bytes(raw)
    (spool := tmp_path / "spool").mkdir()
    with ParseWorker(limits=ParseLimits(spool_dir=str(spool))) as reading:
        parsed = reading.parse_file(stored)
    [attachment] = parsed.attachments
    assert attachment.spooled is not None and Path(attachment.spooled.path).parent == spool
    assert attachment.read() == parse_mail(raw).attachments[0].data
    assert parsed.text == parse_mail(raw).text


def test_a_mail_file_the_child_cannot_read_is_an_os_error_and_the_child_goes_on(
    tmp_path: Path,
) -> None:
    with ParseWorker() as reading:
        with pytest.raises(OSError, match="could not read the mail: IsADirectoryError"):
            reading.parse_file(tmp_path)  # It exists, as a directory, so only the child fails.
        assert reading.parse(sample("gmail_en_reply.eml")).from_address


def test_a_result_naming_a_file_outside_the_spool_is_refused_and_the_file_kept(
    tmp_path: Path,
) -> None:
    (keep := tmp_path / "daemon-secret").write_bytes(b"not an attachment")
    (spool := tmp_path / "spool").mkdir()
    with ParseWorker(limits=ParseLimits(spool_dir=str(spool)), parse_function=hostile_parse) as w:
        assert reason(w, command("Escape", str(keep).encode())) == (
            "parser crashed: it named a file outside the spool"
        )
    assert keep.read_bytes() == b"not an attachment"
