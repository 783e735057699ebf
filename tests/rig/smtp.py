"""A recording SMTP server on aiosmtpd that can also refuse or drop mail on demand."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from .dovecot import free_port

Stage = Literal["rcpt", "data"]


@dataclass
class RecordedMail:
    """One mail transaction that reached the end of DATA."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    message: EmailMessage
    status: str
    mail_options: list[str] = field(default_factory=list)
    rcpt_options: list[str] = field(default_factory=list)
    peer: Any = None

    @property
    def accepted(self) -> bool:
        """Return True if the server answered 250 to this mail."""
        return self.status.startswith("250")


@dataclass
class _Behaviour:
    """A pending refusal or drop, consumed once per affected command."""

    action: Literal["fail", "drop"]
    stage: Stage
    code: int = 0
    message: str = ""
    remaining: int | None = 1


class _CountingSMTP(SMTP):
    """An aiosmtpd SMTP protocol that reports every new connection."""

    def __init__(self, on_connect: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        """Remember the connection callback and set up the normal protocol."""
        super().__init__(*args, **kwargs)
        self._on_connect = on_connect

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection, except the re-entry after STARTTLS."""
        if self._original_transport is None:
            self._on_connect()
        super().connection_made(transport)


class _RigController(Controller):
    """A Controller that builds the counting SMTP protocol."""

    def __init__(self, handler: RecordingSMTPServer, **kwargs: Any) -> None:
        """Keep a reference to the recording server for factory()."""
        super().__init__(handler, **kwargs)
        self._rig = handler

    def factory(self) -> SMTP:
        """Return one protocol instance per connection."""
        return _CountingSMTP(self._rig._count_connection, self.handler, **self.SMTP_kwargs)


class RecordingSMTPServer:
    """An SMTP server on 127.0.0.1 that records mail and can simulate failures."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        """Prepare an idle server; call start() to listen."""
        self.port = 0
        self.connections = 0
        self.mails: list[RecordedMail] = []
        self.attempts: list[RecordedMail] = []
        self._cond = threading.Condition()
        self._behaviour: _Behaviour | None = None
        self._controller: _RigController | None = None

    def start(self, port: int | None = None) -> None:
        """Start listening on a loopback port (a free one unless given) in a background thread."""
        self.port = port or free_port()
        # A fixed hostname avoids socket.getfqdn(), which can stall on some hosts.
        self._controller = _RigController(
            self, hostname=self.host, port=self.port, server_hostname="smtp.rig.test"
        )
        self._controller.start()
        # Controller.start() opens one connection itself to check readiness.
        with self._cond:
            self.connections = 0

    def stop(self) -> None:
        """Stop the server thread and close the listening socket."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def fail_next(
        self, code: int, count: int | None = 1, message: str | None = None, stage: Stage = "data"
    ) -> None:
        """Answer `code` at RCPT or end of DATA for the next `count` (None: all) commands."""
        if not 400 <= code < 600:
            raise ValueError(f"Expected a 4xx or 5xx code, got {code}")
        text = message or f"{code // 100}.0.0 Refused by the maildesk test rig"
        with self._cond:
            self._behaviour = _Behaviour("fail", stage, code, text, count)

    def drop_next(self, count: int | None = 1) -> None:
        """Close the connection without answering at the end of DATA."""
        with self._cond:
            self._behaviour = _Behaviour("drop", "data", remaining=count)

    def reset(self) -> None:
        """Go back to accepting every mail."""
        with self._cond:
            self._behaviour = None

    def clear(self) -> None:
        """Forget recorded mails, attempts and the connection count."""
        with self._cond:
            self.mails.clear()
            self.attempts.clear()
            self.connections = 0

    def wait_for(
        self,
        count: int = 1,
        timeout: float = 10,
        predicate: Callable[[RecordedMail], bool] | None = None,
    ) -> list[RecordedMail]:
        """Wait until at least `count` accepted mails match and return those mails."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                matching = [m for m in self.mails if predicate is None or predicate(m)]
                if len(matching) >= count:
                    return matching
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"Expected {count} matching mails within {timeout}s; got "
                        f"{len(matching)} (of {len(self.mails)} accepted, "
                        f"{len(self.attempts)} attempts)"
                    )
                self._cond.wait(remaining)

    def _count_connection(self) -> None:
        """Record that a client connected; called on the server thread."""
        with self._cond:
            self.connections += 1
            self._cond.notify_all()

    def _take(self, stage: Stage) -> _Behaviour | None:
        """Consume one use of the current behaviour if it applies to this stage."""
        with self._cond:
            behaviour = self._behaviour
            if behaviour is None or behaviour.stage != stage:
                return None
            if behaviour.remaining is not None:
                behaviour.remaining -= 1
                if behaviour.remaining <= 0:
                    self._behaviour = None
            return behaviour

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        """Accept the recipient unless a RCPT-stage failure is pending."""
        behaviour = self._take("rcpt")
        if behaviour is not None:
            return f"{behaviour.code} {behaviour.message}"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record the mail, or refuse it, or drop the connection, as configured."""
        behaviour = self._take("data")
        if behaviour is None:
            status = "250 2.0.0 Message accepted"
        elif behaviour.action == "fail":
            status = f"{behaviour.code} {behaviour.message}"
        else:
            status = "dropped"
        raw = bytes(envelope.original_content or b"")
        mail = RecordedMail(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            raw=raw,
            message=BytesParser(_class=EmailMessage, policy=policy.default).parsebytes(raw),
            status=status,
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),
            peer=session.peer,
        )
        with self._cond:
            self.attempts.append(mail)
            if mail.accepted:
                self.mails.append(mail)
            self._cond.notify_all()
        if status == "dropped":
            assert isinstance(server.transport, asyncio.Transport)
            server.transport.abort()
            # connection_lost() cancels this coroutine; waiting here keeps aiosmtpd
            # from writing a reply into the aborted transport.
            await asyncio.Event().wait()
        return status
