"""The probes of `maildesk check`: can this config work, asked of every server it names.

Each probe returns findings, one line each: "ok", "warn" (it works, but something is worth
knowing), "FAIL" (the daemon would not work) or "skip" (not asked: disabled, or it needs what
failed). A probe never sends a mail and never changes the store; it may create the IMAP folders
that the daemon would create at start. Every network step has a socket timeout, and each probe
as a whole a deadline, so that a server that never answers cannot hang the command.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import smtplib
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import sqlalchemy as sa
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError
from sqlmodel import Session, col, select

from maildesk import oauth2
from maildesk.config import ImapSettings, Settings
from maildesk.ingress.imap import ImapConnection
from maildesk.ops.messages import TRUST_WARNING
from maildesk.outbound.transport import reply_text
from maildesk.store import database
from maildesk.store.database import StoreError
from maildesk.store.models import Agent

SOCKET_TIMEOUT = 10.0  # each network operation of a probe
PROBE_DEADLINE = 25.0  # a whole probe, which may take a few network operations
# The greeting of maildesk's own listener: aiosmtpd's "220 <hostname> <ident>".
_MAILDESK_BANNER = re.compile(r"^220[ -]\S+ maildesk(?:\s|$)")

State = Literal["ok", "warn", "FAIL", "skip"]


@dataclass(frozen=True)
class Finding:
    """One line of the report: a state, the probe's name and what it found."""

    state: State
    probe: str
    text: str

    @property
    def line(self) -> str:
        """The line as printed: `ok    store: sqlite, schema at revision 0003`."""
        return f"{self.state:<6}{self.probe}: {self.text}"


Probe = Callable[[Settings], list[Finding]]


def _reason(exc: BaseException) -> str:
    """An exception as a short reason: the errno's words when there is one."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {SOCKET_TIMEOUT:g} s"
    if isinstance(exc, OSError) and exc.errno and not isinstance(exc, ssl.SSLError):
        return os.strerror(exc.errno).lower()
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# store


def _schema_state(settings: Settings) -> tuple[str, str | None, str | None]:
    """(the dialect, the schema's revision, a failure) of the configured store."""
    missing = database.missing_database(settings.store_url)
    if missing is not None:
        return "sqlite", None, (
            f"the database {missing} does not exist; create it with `maildesk db upgrade`"
        )
    engine = database.make_engine(settings.store_url)
    try:
        current = database.current_revision(engine)
        database.check_schema(engine)
    except StoreError as exc:
        return engine.dialect.name, None, str(exc)
    except sa.exc.SQLAlchemyError as exc:
        return engine.dialect.name, None, f"cannot open the database: {_reason(exc)}"
    finally:
        engine.dispose()
    return engine.dialect.name, current, None


def probe_store(settings: Settings) -> list[Finding]:
    """The database answers and its schema is the one this maildesk needs."""
    dialect, revision, failure = _schema_state(settings)
    if failure is not None:
        return [Finding("FAIL", "store", f"{dialect}, {failure}")]
    return [Finding("ok", "store", f"{dialect}, schema at revision {revision}")]


def probe_agents(settings: Settings) -> list[Finding]:
    """Somebody receives the new tickets: an active agent, and an active EU one."""
    if _schema_state(settings)[2] is not None:
        return [Finding("skip", "agents", "not checked: the store cannot be used")]
    engine = database.make_engine(settings.store_url)
    try:
        with Session(engine) as session:
            regions = list(session.exec(
                select(Agent.region).where(col(Agent.active).is_(True))
            ))  # fmt: skip
    finally:
        engine.dispose()
    if not regions:
        return [Finding("warn", "agents", "no active agent; new tickets reach nobody")]
    eu, us = regions.count("eu"), regions.count("us")
    if not eu:
        return [Finding("warn", "agents", "no active EU agent; tickets of companies without "
                        "after-hours support reach nobody")]  # fmt: skip
    return [Finding("ok", "agents", f"{len(regions)} active ({eu} EU, {us} US)")]


# imap


def _imap_connect(settings: ImapSettings) -> IMAPClient:
    """Connect with the configured TLS, as the fetcher does (STARTTLS included)."""
    context = ssl.create_default_context() if settings.tls != "none" else None
    client = IMAPClient(
        settings.host, port=settings.port, ssl=settings.tls == "ssl", ssl_context=context,
        timeout=SOCKET_TIMEOUT,
    )  # fmt: skip
    if settings.tls == "starttls":
        try:
            client.starttls(context)
        except BaseException:
            with contextlib.suppress(OSError, IMAPClientError):
                client.shutdown()
            raise
    return client


def _imap_folders(conn: ImapConnection) -> tuple[list[str], str | None]:
    """What became of the processed and quarantine folders, or the failure."""
    said = []
    for name in (conn.processed, conn.quarantine):
        if conn.client.folder_exists(name):
            said.append(f"{name} exists")
            continue
        try:
            conn.client.create_folder(name)
        except IMAPClientError as exc:
            return said, f"the folder {name} is missing and cannot be created: {_reason(exc)}"
        with contextlib.suppress(IMAPClientError):
            conn.client.subscribe_folder(name)
        said.append(f"{name} created")
    return said, None


def probe_imap(settings: Settings) -> list[Finding]:
    """Log in, find the watched folder, make sure the two others exist, look at capabilities."""
    imap = settings.imap
    if not imap.enabled:
        return [Finding("skip", "imap", "[imap] enabled = false")]
    where = f"{imap.host}:{imap.port} (tls {imap.tls})"
    try:
        client = _imap_connect(imap)
    except (OSError, IMAPClientError) as exc:
        return [Finding("FAIL", "imap", f"cannot connect to {where}: {_reason(exc)}")]
    try:
        assert imap.username is not None  # Checked by config, as the password or oauth2 keys.
        try:
            if imap.auth == "xoauth2":
                oauth2.imap_login(client, imap.username, oauth2.source_for(imap))
            else:
                assert imap.password is not None
                client.login(imap.username, imap.password.get_secret_value())
        except LoginError:
            return [Finding("FAIL", "imap", f"login refused for user {imap.username}")]
        except oauth2.TokenError as exc:
            return [Finding("FAIL", "imap", f"no access token for user {imap.username}: {exc}")]
        conn = ImapConnection(client, imap)
        if not client.folder_exists(conn.folder):
            return [Finding("FAIL", "imap", f"the watched folder {conn.folder} does not exist")]
        said, failure = _imap_folders(conn)
        if failure is not None:
            return [Finding("FAIL", "imap", failure)]
        findings = [Finding("ok", "imap", f"logged in as {imap.username} at {where}; watching "
                            f"{conn.folder}; {', '.join(said)}")]  # fmt: skip
        if imap.idle and not client.has_capability("IDLE"):
            findings.append(Finding("warn", "imap", "no IDLE: new mail is seen only every "
                                    f"{imap.poll_seconds} s ([imap] poll_seconds)"))
        if not client.has_capability("MOVE"):
            findings.append(Finding("warn", "imap", "no MOVE: mails are moved with COPY, "
                                    "\\Deleted and EXPUNGE"))
        return findings
    except (OSError, IMAPClientError) as exc:
        return [Finding("FAIL", "imap", f"{where}: {_reason(exc)}")]
    finally:
        with contextlib.suppress(OSError, IMAPClientError):
            client.logout()
        with contextlib.suppress(OSError, IMAPClientError):
            client.shutdown()


# relay


def _smtp_session(settings: Settings) -> Iterator[str]:
    """Walk one SMTP session up to QUIT, yielding what each step established."""
    cfg = settings.smtp
    helo = settings.desk.domain  # As the transport does: getfqdn() can stall.
    context = ssl.create_default_context()
    client: smtplib.SMTP
    if cfg.tls == "ssl":
        client = smtplib.SMTP_SSL(cfg.host, cfg.port, helo, timeout=SOCKET_TIMEOUT,
                                  context=context)
    else:
        client = smtplib.SMTP(cfg.host, cfg.port, helo, timeout=SOCKET_TIMEOUT)
    try:
        yield "connected"
        code, message = client.ehlo()
        if code != 250:
            raise smtplib.SMTPResponseException(code, message)
        yield "EHLO"
        if cfg.tls == "starttls":
            if not client.has_extn("starttls"):
                raise smtplib.SMTPNotSupportedError("the relay offers no STARTTLS")
            client.starttls(context=context)
            client.ehlo()
            yield "STARTTLS"
        if cfg.username:
            if not client.has_extn("auth"):
                raise smtplib.SMTPNotSupportedError("the relay offers no AUTH")
            if cfg.auth == "xoauth2":
                oauth2.smtp_login(client, cfg.username, oauth2.source_for(cfg))
                yield f"AUTH XOAUTH2 as {cfg.username}"
            else:
                secret = cfg.password.get_secret_value() if cfg.password else ""
                client.login(cfg.username, secret)
                yield f"AUTH as {cfg.username}"
        client.quit()
    finally:
        client.close()


def probe_relay(settings: Settings) -> list[Finding]:
    """The relay takes a session (EHLO, STARTTLS, AUTH as configured), or the maildir a file."""
    if settings.smtp.transport == "maildir":
        return _probe_maildir(settings.outgoing_maildir)
    cfg = settings.smtp
    where = f"{cfg.host}:{cfg.port} (tls {cfg.tls})"
    done: list[str] = []
    try:
        for step in _smtp_session(settings):
            done.append(step)
    except smtplib.SMTPAuthenticationError as exc:
        return [Finding("FAIL", "relay", f"login refused for user {cfg.username}: "
                        f"{reply_text(exc.smtp_code, exc.smtp_error)}")]  # fmt: skip
    except oauth2.TokenError as exc:
        return [Finding("FAIL", "relay", f"no access token for user {cfg.username}: {exc}")]
    except smtplib.SMTPResponseException as exc:
        step = f"after {done[-1]}" if done else "on connecting"
        return [Finding("FAIL", "relay", f"{where} refused {step}: "
                        f"{reply_text(exc.smtp_code, exc.smtp_error)}")]  # fmt: skip
    except (smtplib.SMTPException, OSError) as exc:
        verb = f"after {done[-1]}, lost" if done else "cannot connect to"
        return [Finding("FAIL", "relay", f"{verb} {where}: {_reason(exc)}")]
    steps = ", ".join(done[1:])
    findings = [Finding("ok", "relay", f"{where} answered {steps}, QUIT; no mail sent")]
    if cfg.username and cfg.tls == "none":
        secret = "access token" if cfg.auth == "xoauth2" else "password"
        findings.append(Finding("warn", "relay", f"the {secret} travels in clear ([smtp] tls "
                                "= \"none\"); use starttls or ssl"))  # fmt: skip
    return findings


def _probe_maildir(path: Path) -> list[Finding]:
    """The maildir transport's directory, or the nearest parent it would be made in, is
    writable: a file is created there and removed.
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    target = path / "tmp" if (path / "tmp").is_dir() else existing
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".maildesk-check-"):
            pass
    except OSError as exc:
        return [Finding("FAIL", "relay", f"maildir {path}: cannot write in {target}: "
                        f"{_reason(exc)}")]  # fmt: skip
    state = "writable" if existing == path else f"will be created (in {existing}, writable)"
    return [Finding("ok", "relay", f"maildir {path} {state}")]


# listener


def _banner(host: str, port: int) -> str | None:
    """The first line a server on host:port says, or None when it says nothing in time."""
    try:
        with socket.create_connection((host, port), timeout=SOCKET_TIMEOUT) as sock:
            data = b""
            while b"\n" not in data and len(data) < 512:
                chunk = sock.recv(512)
                if not chunk:
                    break
                data += chunk
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
    except OSError:
        return None
    line = data.split(b"\n", 1)[0].decode("ascii", "replace").strip()
    return line or None


def probe_listener(settings: Settings) -> list[Finding]:
    """The listener's address can be bound, or a running maildesk holds it already."""
    cfg = settings.listener
    if not cfg.enabled:
        return [Finding("skip", "listener", "[listener] enabled = false")]
    where = f"{cfg.host}:{cfg.port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            cfg.host, cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError as exc:
        return [Finding("FAIL", "listener", f"cannot resolve {cfg.host}: {_reason(exc)}")]
    try:
        with socket.socket(family, kind, proto) as sock:
            # As asyncio's create_server does, so that a port in TIME_WAIT counts as free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return [Finding("FAIL", "listener", f"cannot listen on {where}: {_reason(exc)}")]
    else:
        return [Finding("ok", "listener", f"{where} is free ({cfg.protocol})")]
    banner = _banner(cfg.host, cfg.port)
    if banner is not None and _MAILDESK_BANNER.match(banner):
        return [Finding("ok", "listener", f"{where} is in use by a running maildesk "
                        f"({banner[:80]})")]  # fmt: skip
    seen = f"it says {banner[:80]!r}" if banner else "it sent no greeting"
    return [Finding("FAIL", "listener", f"{where} is in use by something else ({seen})")]


# trust


def probe_trust(settings: Settings) -> list[Finding]:
    """Whose Authentication-Results are believed."""
    trusted = settings.security.trusted_authserv_id
    if trusted is None:
        return [Finding("warn", "trust", TRUST_WARNING)]
    return [Finding("ok", "trust", f"Authentication-Results of {trusted} are believed")]


PROBES: tuple[tuple[str, Probe], ...] = (
    ("store", probe_store),
    ("imap", probe_imap),
    ("relay", probe_relay),
    ("listener", probe_listener),
    ("agents", probe_agents),
    ("trust", probe_trust),
)


def run_probes(settings: Settings, *, deadline: float = PROBE_DEADLINE) -> Iterator[Finding]:
    """Run every probe at once, each in its own thread, and yield their findings in order.

    A probe still running at its deadline is reported as failed and left behind: its thread is
    a daemon, so it cannot keep the command from ending.
    """
    results: dict[str, list[Finding]] = {}

    def run(name: str, probe: Probe) -> None:
        try:
            results[name] = probe(settings)
        except Exception as exc:  # A probe's bug must not hide the other probes' findings.
            results[name] = [Finding("FAIL", name, f"the probe failed: {_reason(exc)}")]

    threads = [
        (name, threading.Thread(target=run, args=(name, probe), daemon=True, name=name))
        for name, probe in PROBES
    ]
    for _, thread in threads:
        thread.start()
    # The probes run at once, so one deadline for all of them gives each its full time.
    end = time.monotonic() + deadline
    for name, thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
        yield from results.get(name) or [
            Finding("FAIL", name, f"no result within {deadline:g} s")
        ]
