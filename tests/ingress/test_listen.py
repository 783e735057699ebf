"""The SMTP/LMTP listener, spoken to with smtplib over a real socket."""

from __future__ import annotations

import asyncio
import logging
import smtplib
import socket
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import pytest
from structlog.testing import capture_logs

from maildesk.config import LimitsSettings, ListenerSettings
from maildesk.ingress.listen import DeskAddresses, Listener
from maildesk.mail.message import Delivery, Outcome, StoreUnavailable

DESK = "support@desk.example"
# CRLF line ends, a line starting with a dot (SMTP transparency) and 8-bit UTF-8.
RAW = (
    b"From: Alice <alice@example.com>\r\nTo: support@desk.example\r\nSubject: Hi\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Bonjour, \xc3\xa7a ne marche pas.\r\n.leading dot\r\n"
)


class Recorder:
    """A stand-in for the pipeline that records calls and answers or fails on demand."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, Delivery]] = []
        self.error: Exception | None = None
        self.lock = threading.Lock()

    def __call__(self, raw: bytes, delivery: Delivery) -> Outcome:
        with self.lock:
            self.calls.append((raw, delivery))
        if self.error is not None:
            raise self.error
        return Outcome(inbound_id=40 + len(self.calls), outcome="ticket", ticket_id=7)


LIMIT = 64 * 1024  # a small max_mail_bytes, so that mails around it are quick to send


def listener_settings(**changes: object) -> ListenerSettings:
    settings = ListenerSettings.model_validate({"host": "127.0.0.1", **changes})
    # Port 0 asks for an ephemeral port; the settings' validation would refuse it.
    return settings.model_copy(update={"port": 0})


async def start_listener(
    protocol: Literal["smtp", "lmtp"],
    recorder: Callable[[bytes, Delivery], Outcome],
    max_mail_bytes: int = LimitsSettings().max_mail_bytes,
    **changes: object,
) -> Listener:
    settings = listener_settings(protocol=protocol, **changes)
    listener = Listener(settings, DESK, recorder, max_mail_bytes=max_mail_bytes)
    await listener.start()
    return listener


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def smtp_listener(recorder: Recorder) -> AsyncIterator[Listener]:
    listener = await start_listener("smtp", recorder)
    yield listener
    await listener.stop()


def talk(port: int, session: Callable[[smtplib.SMTP], Any]) -> Any:
    """Run one blocking smtplib session (call it in a thread: the listener needs the loop)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.example")
        return session(smtp)


def test_desk_addresses() -> None:
    desk = DeskAddresses("support@desk.example")
    assert desk.accepts("support@desk.example")
    assert desk.accepts("Support+ABC@Desk.Example")
    assert not desk.accepts("supportx@desk.example")
    assert not desk.accepts("support@other.example")
    assert not desk.accepts("support")


async def test_accepted_mail_reaches_handler_byte_exact(
    smtp_listener: Listener, recorder: Recorder
) -> None:
    def session(smtp: smtplib.SMTP) -> Any:
        assert smtp.mail("bob@example.com", ["BODY=8BITMIME"])[0] == 250
        assert smtp.rcpt(DESK)[0] == 250
        return smtp.data(RAW)

    code, message = await asyncio.to_thread(talk, smtp_listener.port, session)
    assert (code, message) == (250, b"2.0.0 OK: queued as 41")
    assert recorder.calls == [
        (RAW, Delivery(source="smtp", envelope_from="bob@example.com", recipients=(DESK,)))
    ]


async def test_foreign_recipient_gets_550(smtp_listener: Listener, recorder: Recorder) -> None:
    def session(smtp: smtplib.SMTP) -> Any:
        smtp.mail("bob@example.com")
        return [smtp.rcpt(a) for a in ("sales@desk.example", "support@other.example")]

    replies = await asyncio.to_thread(talk, smtp_listener.port, session)
    assert replies == [
        (550, b"5.1.1 <sales@desk.example>: not a mailbox of this desk"),
        (550, b"5.1.1 <support@other.example>: not a mailbox of this desk"),
    ]
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        await asyncio.to_thread(
            talk, smtp_listener.port, lambda s: s.sendmail("bob@example.com", ["x@y.z"], RAW)
        )
    assert recorder.calls == []


async def test_subaddress_and_bounce_are_accepted(
    smtp_listener: Listener, recorder: Recorder
) -> None:
    address = "Support+abc@DESK.example"
    refused = await asyncio.to_thread(
        talk, smtp_listener.port, lambda s: s.sendmail("<>", [address], RAW)
    )
    assert refused == {}
    assert recorder.calls[0][1] == Delivery(source="smtp", envelope_from="", recipients=(address,))


@pytest.mark.parametrize("error", [StoreUnavailable("db down"), RuntimeError("a bug")])
async def test_handler_failure_gives_451(
    smtp_listener: Listener, recorder: Recorder, error: Exception
) -> None:
    recorder.error = error
    with pytest.raises(smtplib.SMTPDataError) as refused:
        await asyncio.to_thread(
            talk, smtp_listener.port, lambda s: s.sendmail("bob@example.com", [DESK], RAW)
        )
    assert refused.value.smtp_code == 451
    assert refused.value.smtp_error == b"4.3.0 Temporary failure, please try again later"
    assert len(recorder.calls) == 1


async def test_lmtp_answers_once_per_recipient(recorder: Recorder) -> None:
    listener = await start_listener("lmtp", recorder)
    recipients = [DESK, "support+urgent@desk.example"]

    def session() -> list[tuple[int, bytes]]:
        with smtplib.LMTP("127.0.0.1", listener.port, timeout=10) as lmtp:
            lmtp.ehlo_or_helo_if_needed()  # LMTP sends LHLO here.
            lmtp.mail("bob@example.com")
            for address in recipients:
                assert lmtp.rcpt(address)[0] == 250
            # smtplib reads only the first reply to DATA; LMTP sends one per recipient.
            return [lmtp.data(RAW), lmtp.getreply()]

    try:
        replies = await asyncio.to_thread(session)
    finally:
        await listener.stop()
    assert replies == [(250, b"2.0.0 OK: queued as 41")] * 2
    delivery = Delivery(
        source="lmtp", envelope_from="bob@example.com", recipients=tuple(recipients)
    )
    assert recorder.calls == [(RAW, delivery)]


async def test_stop_closes_the_port(recorder: Recorder) -> None:
    listener = await start_listener("smtp", recorder)
    port = listener.port
    await listener.stop()
    with pytest.raises(OSError):
        await asyncio.to_thread(talk, port, lambda s: None)


async def test_stop_lets_the_mail_in_hand_finish(recorder: Recorder) -> None:
    release, called = threading.Event(), threading.Event()
    answer = recorder.__call__

    def slow(raw: bytes, delivery: Delivery) -> Outcome:
        called.set()
        release.wait(10)
        return answer(raw, delivery)

    listener = await start_listener("smtp", slow)
    mail = lambda smtp: smtp.sendmail("bob@example.com", [DESK], RAW)  # noqa: E731
    send = asyncio.create_task(asyncio.to_thread(talk, listener.port, mail))
    assert await asyncio.to_thread(called.wait, 10)
    stopping = asyncio.create_task(listener.stop())
    await asyncio.sleep(0.1)
    assert not stopping.done()  # It waits for the transaction under way.
    release.set()
    await asyncio.wait_for(stopping, 10)
    assert await asyncio.wait_for(send, 10) == {}
    assert len(recorder.calls) == 1


def mail_of_size(size: int, subject: str = "Journal d'erreurs de l'export") -> bytes:
    """A plain-text mail of exactly `size` bytes, CRLF line ends and no line starting with a dot
    (so that it travels unchanged and SMTP transparency adds nothing on the wire).
    """
    head = (
        "Date: Fri, 14 Mar 2025 09:15:02 +0100\r\n"
        "From: Camille Durand <camille@customer.example>\r\n"
        "To: support@desk.example\r\n"
        f"Subject: {subject}\r\n"
        "Message-ID: <f3a1c2e4-77b0-4c1e-9a55-0d2b7e1c9f10@customer.example>\r\n"
        "MIME-Version: 1.0\r\n"
        "User-Agent: Mozilla Thunderbird\r\n"
        "Content-Type: text/plain; charset=UTF-8; format=flowed\r\n"
        "Content-Transfer-Encoding: 7bit\r\n\r\n"
    ).encode()
    line = b"2025-03-14 09:12:44 ERROR export.pdf: renderer timed out after 30 s\r\n"
    full, rest = divmod(size - len(head), len(line))
    # The last line absorbs the remainder, so that every line still ends with CRLF.
    last = b"x" * (len(line) + rest - 2) + b"\r\n"
    raw = head + line * (full - 1) + last
    assert len(raw) == size
    return raw


class Wire:
    """A raw client socket, for what smtplib cannot do: trickle DATA, hold sessions open."""

    def __init__(self, port: int) -> None:
        # The timeout is only a safety net: every read below expects the server to act first.
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\r\n")

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed after {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line + b"\r\n"

    def reply(self) -> bytes:
        """One whole reply, all its lines."""
        lines = [self._line()]
        while lines[-1][3:4] == b"-":
            lines.append(self._line())
        return b"".join(lines)

    def command(self, line: bytes) -> bytes:
        self.send(line)
        return self.reply()

    def until_closed(self) -> bytes:
        """Everything the server sends until it closes the connection."""
        data, self.buffer = self.buffer, b""
        while chunk := self.sock.recv(65536):
            data += chunk
        return data

    def start_data(self) -> None:
        """Greeting, EHLO, MAIL, RCPT and DATA, each answered as a desk should."""
        assert self.reply().startswith(b"220 ")
        assert self.command(b"EHLO client.example").startswith(b"250-")
        assert self.command(b"MAIL FROM:<camille@customer.example>").startswith(b"250 ")
        assert self.command(b"RCPT TO:<support@desk.example>").startswith(b"250 ")
        assert self.command(b"DATA").startswith(b"354 ")

    def close(self) -> None:
        self.sock.close()


def one_mail(raw: bytes) -> Callable[[smtplib.SMTP], Any]:
    """An smtplib session that sends `raw` without declaring SIZE, so that only DATA can
    refuse it; returns the DATA reply.
    """

    def session(smtp: smtplib.SMTP) -> Any:
        assert smtp.mail("camille@customer.example")[0] == 250
        assert smtp.rcpt(DESK)[0] == 250
        return smtp.data(raw)

    return session


async def test_mail_at_the_limit_is_accepted_and_ehlo_shows_size(recorder: Recorder) -> None:
    listener = await start_listener("smtp", recorder, max_mail_bytes=LIMIT)
    raw = mail_of_size(LIMIT)

    def session(smtp: smtplib.SMTP) -> Any:
        return smtp.esmtp_features.get("size"), one_mail(raw)(smtp)

    try:
        size, reply = await asyncio.to_thread(talk, listener.port, session)
    finally:
        await listener.stop()
    assert size == str(LIMIT)
    assert reply == (250, b"2.0.0 OK: queued as 41")
    delivery = Delivery(source="smtp", envelope_from="camille@customer.example", recipients=(DESK,))
    assert recorder.calls == [(raw, delivery)]
    assert listener.budget.held == 0


async def test_mail_one_byte_over_the_limit_gets_552(recorder: Recorder) -> None:
    listener = await start_listener("smtp", recorder, max_mail_bytes=LIMIT)
    try:
        reply = await asyncio.to_thread(talk, listener.port, one_mail(mail_of_size(LIMIT + 1)))
    finally:
        await listener.stop()
    assert reply == (552, b"5.3.4 Message too big for this desk (limit 65536 bytes)")
    assert recorder.calls == []
    assert listener.budget.held == 0


async def test_declared_size_over_the_limit_is_refused_at_mail(recorder: Recorder) -> None:
    listener = await start_listener("smtp", recorder, max_mail_bytes=LIMIT)
    raw = mail_of_size(LIMIT + 1)
    try:
        # smtplib declares SIZE= in MAIL FROM because EHLO announced SIZE.
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            await asyncio.to_thread(
                talk, listener.port, lambda s: s.sendmail("camille@customer.example", [DESK], raw)
            )
    finally:
        await listener.stop()
    assert refused.value.smtp_code == 552
    assert recorder.calls == []


@pytest.mark.parametrize("line_end", [b"\r\n", b""], ids=["lines", "one-endless-line"])
async def test_an_oversized_mail_is_not_kept_in_memory(recorder: Recorder, line_end: bytes) -> None:
    listener = await start_listener("smtp", recorder, max_mail_bytes=LIMIT)
    chunk = (b"y" * 998 + line_end) * 64
    sent = 8 * 1024 * 1024

    def send() -> bytes:
        wire = Wire(listener.port)
        wire.start_data()
        for _ in range(sent // len(chunk)):
            wire.sock.sendall(chunk)
        reply = wire.command(b"\r\n.")
        wire.close()
        return reply

    tracemalloc.start()
    try:
        reply = await asyncio.to_thread(send)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await listener.stop()
    assert reply == b"552 5.3.4 Message too big for this desk (limit 65536 bytes)\r\n"
    # Far less than the 8 MiB sent: the refused mail was read to its end but not kept.
    assert peak < 3 * 1024 * 1024
    assert recorder.calls == []


async def test_lmtp_refuses_an_oversized_mail_once_per_recipient(recorder: Recorder) -> None:
    listener = await start_listener("lmtp", recorder, max_mail_bytes=LIMIT)

    def session() -> list[tuple[int, bytes]]:
        with smtplib.LMTP("127.0.0.1", listener.port, timeout=10) as lmtp:
            lmtp.ehlo_or_helo_if_needed()
            lmtp.mail("camille@customer.example")
            for address in (DESK, "support+urgent@desk.example"):
                assert lmtp.rcpt(address)[0] == 250
            return [lmtp.data(mail_of_size(LIMIT + 1)), lmtp.getreply()]

    try:
        replies = await asyncio.to_thread(session)
    finally:
        await listener.stop()
    assert replies == [(552, b"5.3.4 Message too big for this desk (limit 65536 bytes)")] * 2
    assert recorder.calls == []


async def test_connection_over_max_sessions_gets_421(recorder: Recorder) -> None:
    listener = await start_listener("smtp", recorder)
    assert listener_settings().max_sessions == 50

    def scenario() -> tuple[list[bytes], bytes, bytes]:
        wires = [Wire(listener.port) for _ in range(50)]
        try:
            # Each greeting proves that its session got a place.
            greetings = [wire.reply() for wire in wires]
            extra = Wire(listener.port)
            refused = extra.until_closed()
            extra.close()
            # Once a session has ended, its place is free again.
            assert wires[0].command(b"QUIT").startswith(b"221 ")
            assert wires[0].until_closed() == b""
            again = Wire(listener.port)
            welcome = again.reply()
            again.close()
        finally:
            for wire in wires:
                wire.close()
        return greetings, refused, welcome

    try:
        greetings, refused, welcome = await asyncio.to_thread(scenario)
    finally:
        await listener.stop()
    assert [greeting[:4] for greeting in greetings] == [b"220 "] * 50
    assert refused == b"421 4.7.0 Too many connections, try again later\r\n"
    assert welcome.startswith(b"220 desk.example")


async def test_recipient_over_max_recipients_gets_452(
    smtp_listener: Listener, recorder: Recorder
) -> None:
    assert listener_settings().max_recipients == 50
    addresses = [f"support+{n}@desk.example" for n in range(51)]

    def session(smtp: smtplib.SMTP) -> Any:
        smtp.mail("camille@customer.example")
        replies = [smtp.rcpt(address) for address in addresses]
        return replies, smtp.data(RAW)

    replies, data = await asyncio.to_thread(talk, smtp_listener.port, session)
    assert [code for code, _ in replies[:50]] == [250] * 50
    assert replies[50] == (452, b"4.5.3 Too many recipients")
    assert data[0] == 250
    assert [delivery.recipients for _, delivery in recorder.calls] == [tuple(addresses[:50])]


async def test_mail_beyond_the_bytes_in_flight_gets_451(recorder: Recorder) -> None:
    release, called = threading.Event(), threading.Event()

    def slow(raw: bytes, delivery: Delivery) -> Outcome:
        if not called.is_set():
            called.set()
            release.wait(10)
        return recorder(raw, delivery)

    listener = await start_listener("smtp", slow, max_bytes_in_flight=1024)
    first, second, third = (mail_of_size(700, f"Export {n}") for n in (1, 2, 3))
    try:
        held = asyncio.create_task(asyncio.to_thread(talk, listener.port, one_mail(first)))
        assert await asyncio.to_thread(called.wait, 10)
        busy = await asyncio.to_thread(talk, listener.port, one_mail(second))
        release.set()
        assert await asyncio.wait_for(held, 10) == (250, b"2.0.0 OK: queued as 41")
        # The first mail's bytes were given back once it was stored.
        after = await asyncio.to_thread(talk, listener.port, one_mail(third))
    finally:
        release.set()
        await listener.stop()
    assert busy == (451, b"4.3.2 System busy, try again later")
    assert after == (250, b"2.0.0 OK: queued as 42")
    assert [raw for raw, _ in recorder.calls] == [first, third]
    assert listener.budget.held == 0


async def test_rejected_recipient_is_logged_without_its_local_part(
    smtp_listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    # A reply address whose domain was mistyped: its local part carries a reply token.
    address = "support+t4821.k7f2q9xw@desk.exmaple"

    def session(smtp: smtplib.SMTP) -> Any:
        smtp.mail("camille@customer.example")
        return smtp.rcpt(address)

    with capture_logs() as logs, caplog.at_level(logging.DEBUG):
        reply = await asyncio.to_thread(talk, smtp_listener.port, session)
    assert reply[0] == 550
    rejected = [entry for entry in logs if entry["event"] == "listener.rejected_recipient"]
    assert [(entry["domain"], entry["length"]) for entry in rejected] == [
        ("desk.exmaple", len(address))
    ]
    assert "k7f2q9xw" not in repr(logs)
    # aiosmtpd's own logger would print the RCPT command line at INFO.
    assert "k7f2q9xw" not in caplog.text


async def test_data_trickled_past_the_data_timeout_gets_421(recorder: Recorder) -> None:
    listener = await start_listener("smtp", recorder, data_timeout_seconds=1)

    def trickle() -> tuple[bytes, int, float]:
        wire = Wire(listener.port)
        wire.start_data()
        started, sent, heard = time.monotonic(), 0, b""
        # Each wait for the server is also the pace of the trickle: a line per 0.3 s of silence.
        wire.sock.settimeout(0.3)
        while time.monotonic() - started < 10:
            try:
                chunk = wire.sock.recv(65536)
            except TimeoutError:
                wire.send(b"Le rapport suit, ligne par ligne.")
                sent += 1
                continue
            if not chunk:
                break
            heard += chunk
        wire.close()
        return heard, sent, time.monotonic() - started

    try:
        heard, sent, elapsed = await asyncio.to_thread(trickle)
    finally:
        await listener.stop()
    assert heard == b"421 4.4.2 DATA took too long, closing connection\r\n"
    assert sent >= 2  # The client was sending all along: it was cut for slowness, not silence.
    assert 1.0 <= elapsed < 5
    assert recorder.calls == []


async def test_idle_timeout_spares_data_and_ends_an_idle_session(recorder: Recorder) -> None:
    listener = await start_listener("smtp", recorder, idle_timeout_seconds=1)

    def session() -> tuple[bytes, bytes, float]:
        wire = Wire(listener.port)
        wire.start_data()
        wire.send(b"Subject: pause\r\n")
        # Silent for longer than the idle timeout, in the middle of DATA: not cut.
        wire.sock.settimeout(1.5)
        with pytest.raises(TimeoutError):
            wire.sock.recv(1)
        wire.sock.settimeout(10)
        stored = wire.command(b"Bonjour.\r\n.")
        replied = time.monotonic()
        # Then idle after the reply: the server closes the connection.
        closed = wire.until_closed()
        wire.close()
        return stored, closed, time.monotonic() - replied

    try:
        stored, closed, idle = await asyncio.to_thread(session)
    finally:
        await listener.stop()
    assert stored == b"250 2.0.0 OK: queued as 41\r\n"
    assert closed == b""
    assert 0.9 <= idle < 5
    assert [raw for raw, _ in recorder.calls] == [b"Subject: pause\r\n\r\nBonjour.\r\n"]
