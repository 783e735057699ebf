"""SMTP/LMTP ingress: an aiosmtpd listener that accepts mail for the desk's own addresses.

The final reply to DATA is sent only after the pipeline's transaction has committed, so a
sending MTA that got 250 can forget the mail, and one that got 451 keeps it and retries.

No peer can make the listener hold more than its settings allow: concurrent sessions,
recipients per mail, bytes per mail (announced as SIZE in EHLO), bytes of all the mails being
received or stored at once, and the time a session may stay idle or spend in DATA.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from maildesk.config import ListenerSettings
from maildesk.logs import get_logger
from maildesk.mail.message import AsyncHandler, Delivery, Handler, StoreUnavailable

log = get_logger("listen")

TEMPORARY_FAILURE = "451 4.3.0 Temporary failure, please try again later"
TOO_BIG = "552 5.3.4 Message too big for this desk (limit {limit} bytes)"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
SYSTEM_BUSY = "451 4.3.2 System busy, try again later"
DATA_TIMEOUT = "421 4.4.2 DATA took too long, closing connection"
# aiosmtpd's own reply for a line over RFC 5321's 1000 octets, kept as it was.
LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
STOP_GRACE_SECONDS = 30.0  # how long stop() waits for mails being stored


class DeskAddresses:
    """Decide whether an address is the desk's: the address itself or a +subaddress of it."""

    def __init__(self, desk_address: str) -> None:
        """Split the desk address into its lower-cased local part and domain."""
        local, _, domain = desk_address.rpartition("@")
        self.local, self.domain = local.lower(), domain.lower()

    def accepts(self, address: str) -> bool:
        """Whether mail to `address` belongs to the desk."""
        local, at, domain = address.rpartition("@")
        if not at or domain.lower() != self.domain:
            return False
        local = local.lower()
        return local == self.local or local.startswith(self.local + "+")


class ByteBudget:
    """The bytes that all mails being received or stored may hold together."""

    def __init__(self, limit: int) -> None:
        """Start with nothing held."""
        self.limit = limit
        self.held = 0

    def take(self, count: int) -> bool:
        """Hold `count` more bytes if that stays within the limit; False (and hold nothing) if
        it would not.
        """
        if self.held + count > self.limit:
            return False
        self.held += count
        return True

    def give_back(self, count: int) -> None:
        """Release bytes taken earlier."""
        self.held -= count


class _DeskHandler:
    """aiosmtpd hooks: bound and filter recipients."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:  # fmt: skip
        """Accept only the desk's own addresses, and only so many of them."""
        if len(envelope.rcpt_tos) >= self._listener.max_recipients:
            return TOO_MANY_RECIPIENTS
        if not self._listener.addresses.accepts(address):
            # A reply address with a mistyped domain still carries its signed token in the
            # local part, so the log gets only what helps to diagnose: domain and length.
            log.info(
                "listener.rejected_recipient", peer=str(session.peer),
                domain=address.rpartition("@")[2].lower(), length=len(address),
            )  # fmt: skip
            return f"550 5.1.1 <{address}>: not a mailbox of this desk"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"


class _DeskSMTP(SMTP):
    """aiosmtpd's SMTP session, held to the listener's bounds.

    DATA is read here rather than by aiosmtpd: aiosmtpd answers an oversized mail with a reply
    of its own wording, counts dot-stuffing against the limit, and keeps every piece of an
    overlong line in memory until a CRLF comes, which may be never.
    """

    def __init__(self, listener: Listener, **kwargs: Any) -> None:
        super().__init__(_DeskHandler(listener), **kwargs)
        self._listener = listener
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the session, or refuse it with 421 when max_sessions are already open."""
        if not self._listener._admit(self):
            peer = transport.get_extra_info("peername")
            log.warning("listener.too_many_sessions", peer=str(peer))
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(TOO_MANY_CONNECTIONS.encode() + b"\r\n")
            transport.close()  # Sends what was written first.
            return
        self._admitted = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        """Free the session's place."""
        if not self._admitted:
            return  # Refused: aiosmtpd never started a session to clean up.
        self._listener._forget(self)
        super().connection_lost(error)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """Receive the mail within the size, memory and time bounds, then store it."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        # aiosmtpd's idle timer counts from the last command, so it would also cut a mail that
        # is still arriving, and one that is being stored; DATA has its own bound instead.
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        try:
            async with asyncio.timeout(self._listener.data_timeout):
                refusal, raw, held = await self._receive()
        except TimeoutError:
            log.info("listener.data_timeout", peer=str(self.session.peer))
            await self.push(DATA_TIMEOUT)
            if self.transport is not None:
                self.transport.close()
            return
        envelope = self.envelope
        self._set_post_data_state()
        status = refusal or await self._listener.deliver(envelope, raw, held)
        # RFC 2033: LMTP answers the end of DATA once per accepted recipient.
        count = len(envelope.rcpt_tos) if self._listener.protocol == "lmtp" else 1
        await self.push("\r\n".join([status] * count))
        if self.transport is not None:
            self._reset_timeout()

    async def _receive(self) -> tuple[str | None, bytes, int]:
        """Read DATA up to the lone dot: a refusal, or None, the mail and the bytes it holds.

        A mail being refused is read to its end (RFC 5321 answers only then) but not kept.
        """
        limit = self.data_size_limit or 0
        budget = self._listener.budget
        mail, size, held = bytearray(), 0, 0
        keeping, too_long, busy = True, False, False
        in_overlong_line = False
        try:
            while True:
                try:
                    line = await self._reader.readuntil(b"\r\n")
                except asyncio.LimitOverrunError as overrun:
                    # A line longer than the reader's limit comes in pieces, none of them kept.
                    chunk = await self._reader.read(overrun.consumed)
                    size += len(chunk)
                    too_long = in_overlong_line = True
                else:
                    if in_overlong_line:
                        # The rest of an overlong line, not a line of its own (not even ".").
                        in_overlong_line = False
                        size += len(line)
                    elif line == b".\r\n":
                        break
                    else:
                        too_long = too_long or len(line) > self.line_length_limit
                        # RFC 5321 4.5.2: remove the transparency dot; SIZE counts the mail.
                        line = line[1:] if line.startswith(b".") else line
                        size += len(line)
                        if keeping and size <= limit and not too_long:
                            if budget.take(len(line)):
                                held += len(line)
                                mail += line
                                continue
                            busy = True
                if keeping and (too_long or busy or size > limit):
                    keeping = False
                    budget.give_back(held)
                    held, mail = 0, bytearray()
        except BaseException:
            budget.give_back(held)
            raise
        if size > limit:
            log.info("listener.too_big", size=size, limit=limit)
            return TOO_BIG.format(limit=limit), b"", 0
        if too_long:
            return LINE_TOO_LONG, b"", 0
        if busy:
            log.warning("listener.busy", size=size, in_flight=budget.held, limit=budget.limit)
            return SYSTEM_BUSY, b"", 0
        return None, bytes(mail), held


class _DeskLMTP(_DeskSMTP, LMTP):
    """The same session speaking LMTP (LHLO instead of HELO and EHLO)."""


class ListenerError(Exception):
    """The listener cannot start (its port is in use, say); the message names the address."""


class Listener:
    """An SMTP or LMTP server in the running event loop that feeds the pipeline."""

    def __init__(
        self, settings: ListenerSettings, desk_address: str, handler: Handler | AsyncHandler, *,
        max_mail_bytes: int,
    ) -> None:  # fmt: skip
        """Remember the settings and the largest mail to take in; call start() to listen."""
        self._settings = settings
        self._handler = handler
        self._max_mail_bytes = max_mail_bytes
        self.addresses = DeskAddresses(desk_address)
        self.protocol = settings.protocol
        self.max_recipients = settings.max_recipients
        self.data_timeout = float(settings.data_timeout_seconds)
        self.budget = ByteBudget(settings.max_bytes_in_flight)
        self._server: asyncio.Server | None = None
        # The sessions that got a place; each leaves in its connection_lost().
        self._sessions: set[_DeskSMTP] = set()
        self._inflight: set[asyncio.Future[Any]] = set()

    @property
    def port(self) -> int:
        """The bound port (the real one when the settings asked for port 0)."""
        if self._server is None:
            raise RuntimeError("the listener is not started")
        return int(self._server.sockets[0].getsockname()[1])

    def _factory(self) -> SMTP:
        server_class = _DeskLMTP if self.protocol == "lmtp" else _DeskSMTP
        return server_class(
            self,
            # aiosmtpd announces SIZE in EHLO and refuses a larger SIZE= in MAIL FROM.
            data_size_limit=self._max_mail_bytes,
            # The pipeline wants the bytes exactly as received, not text.
            decode_data=False,
            enable_SMTPUTF8=True,
            hostname=self.addresses.domain,
            ident="maildesk",
            timeout=self._settings.idle_timeout_seconds,
            loop=asyncio.get_running_loop(),
        )

    def _admit(self, session: _DeskSMTP) -> bool:
        # Counted at connection_made() rather than in the factory: asyncio may build several
        # protocols for a burst of connections before any of them is connected.
        if len(self._sessions) >= self._settings.max_sessions:
            return False
        self._sessions.add(session)
        return True

    def _forget(self, session: _DeskSMTP) -> None:
        self._sessions.discard(session)

    async def start(self) -> None:
        """Bind and start accepting connections."""
        # aiosmtpd logs every command line at INFO, recipients included; whatever the logging
        # setup, those lines must not reach a log (see listener.rejected_recipient).
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        loop = asyncio.get_running_loop()
        where = f"{self._settings.host}:{self._settings.port}"
        try:
            self._server = await loop.create_server(
                self._factory, host=self._settings.host, port=self._settings.port
            )
        except OSError as exc:
            # A port in use, an address this host does not have: one line for the operator.
            # asyncio's own text repeats the address; the errno's says it plainly.
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise ListenerError(f"[listener] cannot listen on {where}: {reason}") from None
        log.info(
            "listener.started", host=self._settings.host, port=self.port, protocol=self.protocol
        )

    async def stop(self) -> None:
        """Stop accepting, let mails being stored finish, then close every connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # A mail whose transaction is under way gets its answer, so that the sender does not
        # send it again; a thread cannot be cancelled anyway.
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=STOP_GRACE_SECONDS)
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), STOP_GRACE_SECONDS)
        log.info("listener.stopped")

    async def __aenter__(self) -> Listener:
        """Start, for `async with`."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop, for `async with`."""
        await self.stop()

    async def deliver(self, envelope: Envelope, raw: bytes, held: int = 0) -> str:
        """Hand one received mail to intake and return the SMTP reply for it.

        `held` bytes of the in-flight budget are given back once the pipeline is done with it.
        """
        mail_from = envelope.mail_from or ""
        delivery = Delivery(
            source=self.protocol,
            # aiosmtpd reports the null reverse-path of bounces as "<>".
            envelope_from="" if mail_from == "<>" else mail_from,
            recipients=tuple(envelope.rcpt_tos),
        )
        # The daemon's handler is a coroutine that group-commits (ingress/group_commit.py); a
        # plain function, such as a test's, runs in a worker thread.
        work = (
            self._handler(raw, delivery) if inspect.iscoroutinefunction(self._handler)
            else asyncio.to_thread(self._handler, raw, delivery)
        )  # fmt: skip
        job = asyncio.ensure_future(work)
        # The bytes stay held until the thread is done with them, even if the client left.
        job.add_done_callback(lambda _job: self.budget.give_back(held))
        self._inflight.add(job)
        try:
            # shield(): if the client hangs up, the commit still runs to its end in the thread,
            # and stop() still sees it as in flight.
            outcome = await asyncio.shield(job)
        except StoreUnavailable:
            log.warning("listener.store_unavailable", recipients=len(delivery.recipients))
            return TEMPORARY_FAILURE
        except Exception as exc:
            # The sending MTA keeps the mail and retries; the bug shows in the log.
            log.error(
                "listener.handler_failed", error=f"{type(exc).__name__}: {exc}", exc_info=True
            )
            return TEMPORARY_FAILURE
        finally:
            job.add_done_callback(self._inflight.discard)
        return f"250 2.0.0 OK: queued as {outcome.inbound_id}"
