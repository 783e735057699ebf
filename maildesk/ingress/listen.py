"""SMTP/LMTP ingress: an aiosmtpd listener that accepts mail for the desk's own addresses.

The final reply to DATA is sent only after the pipeline's transaction has committed, so a
sending MTA that got 250 can forget the mail, and one that got 451 keeps it and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from maildesk.config import ListenerSettings
from maildesk.logs import get_logger
from maildesk.mail.message import Delivery, Handler, StoreUnavailable

log = get_logger("listen")

DATA_SIZE_LIMIT = 50 * 1024 * 1024
TEMPORARY_FAILURE = "451 4.3.0 Temporary failure, please try again later"
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


class _DeskHandler:
    """aiosmtpd hooks: filter recipients, hand DATA to the pipeline."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:  # fmt: skip
        """Accept only the desk's own addresses."""
        if not self._listener.addresses.accepts(address):
            log.info("listener.rejected_recipient", peer=str(session.peer), recipient=address)
            return f"550 5.1.1 <{address}>: not a mailbox of this desk"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Store the mail once, then answer once per recipient for LMTP, once for SMTP."""
        status = await self._listener.deliver(envelope)
        if self._listener.protocol == "lmtp":
            # aiosmtpd's LMTP sends whatever handle_DATA returns, so the per-recipient replies
            # that RFC 2033 requires are joined into one multi-line push.
            return "\r\n".join(status for _ in envelope.rcpt_tos)
        return status


class Listener:
    """An SMTP or LMTP server in the running event loop that feeds the pipeline."""

    def __init__(self, settings: ListenerSettings, desk_address: str, handler: Handler) -> None:
        """Remember the settings; call start() to listen."""
        self._settings = settings
        self._handler = handler
        self.addresses = DeskAddresses(desk_address)
        self.protocol = settings.protocol
        self._server: asyncio.Server | None = None
        # Weak: a session is forgotten once its connection is gone.
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self._inflight: set[asyncio.Future[Any]] = set()

    @property
    def port(self) -> int:
        """The bound port (the real one when the settings asked for port 0)."""
        if self._server is None:
            raise RuntimeError("the listener is not started")
        return int(self._server.sockets[0].getsockname()[1])

    def _factory(self) -> SMTP:
        server_class = LMTP if self.protocol == "lmtp" else SMTP
        session = server_class(
            _DeskHandler(self),
            data_size_limit=DATA_SIZE_LIMIT,
            # The pipeline wants the bytes exactly as received, not text.
            decode_data=False,
            enable_SMTPUTF8=True,
            hostname=self.addresses.domain,
            ident="maildesk",
            loop=asyncio.get_running_loop(),
        )
        self._sessions.add(session)
        return session

    async def start(self) -> None:
        """Bind and start accepting connections."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._factory, host=self._settings.host, port=self._settings.port
        )
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
        self._sessions.clear()
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

    async def deliver(self, envelope: Envelope) -> str:
        """Hand one received mail to the pipeline and return the SMTP reply for it."""
        mail_from = envelope.mail_from or ""
        delivery = Delivery(
            source=self.protocol,
            # aiosmtpd reports the null reverse-path of bounces as "<>".
            envelope_from="" if mail_from == "<>" else mail_from,
            recipients=tuple(envelope.rcpt_tos),
        )
        raw = bytes(envelope.original_content or b"")
        job = asyncio.ensure_future(asyncio.to_thread(self._handler, raw, delivery))
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
