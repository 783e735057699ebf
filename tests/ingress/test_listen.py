"""The SMTP/LMTP listener, spoken to with smtplib over a real socket."""

from __future__ import annotations

import asyncio
import smtplib
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import pytest

from maildesk.config import ListenerSettings
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


async def start_listener(protocol: Literal["smtp", "lmtp"], recorder: Recorder) -> Listener:
    # Port 0 asks for an ephemeral port; the settings' validation would refuse it.
    settings = ListenerSettings(host="127.0.0.1", protocol=protocol)
    settings = settings.model_copy(update={"port": 0})
    listener = Listener(settings, DESK, recorder)
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

    listener = Listener(
        ListenerSettings(host="127.0.0.1").model_copy(update={"port": 0}), DESK, slow
    )
    await listener.start()
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
