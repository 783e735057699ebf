"""End-to-end harness: `maildesk run` as a process against the rig's Dovecot and SMTP server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rig.dovecot import ImapAccount, free_port
from rig.smtp import RecordingSMTPServer
from sqlmodel import Session, select

from maildesk.store import database, directory
from maildesk.store.models import RECEIVED, InboundMail, Message, Outbox, Ticket

DESK = "support@desk.example"
CUSTOMER = "claire.dupont@client.example"
COLLEAGUE = "marc.petit@client.example"
AGENT = "alice.martin@vendor.example"
US_AGENT = "bob.smith@vendor.example"


def customer_mail(
    subject: str = "Export PDF en erreur",
    text: str = "Bonjour,\n\nL'export PDF échoue depuis ce matin.\n\nClaire",
    sender: str = CUSTOMER,
    to: str = DESK,
    **headers: str,
) -> EmailMessage:
    """A plain mail as a customer's client would send it."""
    mail = EmailMessage(policy=policy.SMTP)
    mail["From"] = f"Claire Dupont <{sender}>"
    mail["To"] = to
    mail["Subject"] = subject
    mail["Date"] = format_datetime(datetime.now(UTC))
    mail["Message-ID"] = make_msgid(domain="client.example")
    for name, value in headers.items():
        mail[name.replace("_", "-")] = value
    mail.set_content(text)
    return mail


@dataclass
class RunningDesk:
    """A `maildesk run` process with its config, database and log."""

    directory: Path
    config: Path
    store_url: str
    engine: sa.Engine
    listener_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the daemon and wait for its "started" log line."""
        before = sum(e.get("event") == "started" for e in self.log_events())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "maildesk", "--config", str(self.config), "run"],
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if sum(e.get("event") == "started" for e in self.log_events()) > before:
                return
            if self.process.poll() is not None:
                raise AssertionError(f"maildesk exited: {self.log_path.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"maildesk did not start: {self.log_path.read_text()}")

    def kill(self) -> None:
        """SIGKILL the daemon, as a crash or the OOM killer would, and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self) -> int:
        """Stop the daemon with SIGTERM and return its exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        events: list[dict[str, Any]] = []
        if not self.log_path.exists():
            return events
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def session(self) -> Session:
        """A session on the desk's database, for looking at what it stored."""
        return Session(self.engine)

    def wait_for_inbound(self, count: int, timeout: float = 20) -> list[InboundMail]:
        """Wait until `count` mails have been processed, whatever their outcome."""
        deadline = time.monotonic() + timeout
        while True:
            with self.session() as session:
                rows = session.exec(
                    select(InboundMail).where(InboundMail.outcome != RECEIVED)
                ).all()
            if len(rows) >= count:
                return list(rows)
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(rows)} mails processed, expected {count}")
            time.sleep(0.05)

    def tickets(self) -> list[Ticket]:
        """Every ticket."""
        with self.session() as session:
            return list(session.exec(select(Ticket).order_by(Ticket.id)))  # type: ignore[arg-type]

    def messages(self, ticket_id: int) -> list[Message]:
        """A ticket's thread."""
        with self.session() as session:
            query = select(Message).where(Message.ticket_id == ticket_id).order_by(Message.id)  # type: ignore[arg-type]
            return list(session.exec(query))

    def outbox(self, kind: str | None = None) -> list[Outbox]:
        """The outbox rows, optionally of one kind."""
        with self.session() as session:
            query = select(Outbox).order_by(Outbox.id)  # type: ignore[arg-type]
            if kind is not None:
                query = query.where(Outbox.kind == kind)
            return list(session.exec(query))


def write_config(
    directory_: Path,
    store_url: str,
    *,
    imap: ImapAccount | None,
    smtp: RecordingSMTPServer,
    listener_port: int,
    security: str = "",
    extra: str = "",
    desk_address: str = DESK,
    smtp_extra: str = "",
) -> Path:
    """A config for the rig: IMAP to Dovecot (or off), the listener, SMTP to the rig server."""
    imap_section = (
        f'[imap]\nenabled = true\nhost = "{imap.host}"\nport = {imap.port}\ntls = "none"\n'
        f'username = "{imap.username}"\npassword = "{imap.password}"\npoll_seconds = 30\n'
        if imap is not None
        else "[imap]\nenabled = false\n"
    )
    text = (
        f'[desk]\nname = "Support"\naddress = "{desk_address}"\nlocale = "fr"\n'
        f'state_dir = "{directory_ / "state"}"\n'
        f'[store]\nurl = "{store_url}"\n'
        f"{imap_section}"
        f'[listener]\nenabled = true\nhost = "127.0.0.1"\nport = {listener_port}\n'
        f'[smtp]\ntransport = "smtp"\nhost = "{smtp.host}"\nport = {smtp.port}\ntls = "none"\n'
        f"{smtp_extra}"
        '[privacy]\nnotice_url = "https://vendor.example/privacy"\n'
        '[security]\nreply_key = "test-reply-key"\n'
        f"{security}{extra}"
    )
    path = directory_ / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def seed(engine: sa.Engine, *, after_hours: bool = False) -> None:
    """A company with two authorised people, and an EU and a US agent."""
    with database.session_scope(engine) as session:
        directory.add_company(session, name="Client SA", after_hours=after_hours, actor="test")
        directory.add_account(session, email=CUSTOMER, name="Claire Dupont",
                              company="Client SA", actor="test")
        directory.add_account(session, email=COLLEAGUE, name="Marc Petit",
                              company="Client SA", locale="en", actor="test")
        directory.add_agent(session, email=AGENT, name="Alice Martin", region="eu", actor="test")
        directory.add_agent(session, email=US_AGENT, name="Bob Smith", region="us", actor="test")


@contextmanager
def running_desk(
    tmp_path: Path,
    store_url: str,
    *,
    imap: ImapAccount | None,
    smtp: RecordingSMTPServer,
    after_hours: bool = False,
    security: str = "",
    extra: str = "",
    listener_port: int | None = None,
    desk_address: str = DESK,
    smtp_extra: str = "",
) -> Iterator[RunningDesk]:
    """A seeded desk whose daemon runs for the duration of the block.

    `security` adds lines to the [security] section, `smtp_extra` to [smtp]; `extra` adds
    sections at the end.
    """
    port = listener_port or free_port()
    config = write_config(tmp_path, store_url, imap=imap, smtp=smtp, listener_port=port,
                          security=security, extra=extra, desk_address=desk_address,
                          smtp_extra=smtp_extra)
    engine = database.make_engine(store_url)
    database.upgrade(engine)
    seed(engine, after_hours=after_hours)
    desk = RunningDesk(tmp_path, config, store_url, engine, port, tmp_path / "maildesk.log")
    desk.start()
    try:
        yield desk
    finally:
        code = desk.stop()
        engine.dispose()
        assert code == 0, desk.log_path.read_text()
