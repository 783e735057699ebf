"""`maildesk check` against the real rig: Dovecot, the recording relay, SQLite, real ports."""

from __future__ import annotations

import dataclasses
import socketserver
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e import AGENT, running_desk, write_config
from rig.dovecot import ImapAccount, free_port
from rig.smtp import RecordingSMTPServer

from maildesk.config import load_settings
from maildesk.daemon import TRUST_WARNING
from maildesk.ops.check import probe_agents, probe_listener
from maildesk.store import database, directory

MAILDESK = Path(sys.executable).parent / "maildesk"
TRUSTED = 'trusted_authserv_id = "mx.desk.example"\n'
HEAD = database.head_revision()


def maildesk(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed `maildesk` command with this config."""
    return subprocess.run([str(MAILDESK), "--config", str(config), *args],
                          capture_output=True, text=True, timeout=120)


class _Greeter(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"220 mx.other.example ESMTP Postfix\r\n")
        self.request.recv(64)


@pytest.fixture
def other_server() -> Iterator[int]:
    """The port of a server that is not maildesk: it greets as Postfix."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Greeter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_a_good_config_is_all_ok_and_sends_no_mail(
    tmp_path: Path, imap_account: ImapAccount, smtp_server: RecordingSMTPServer
) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    listener = free_port()
    config = write_config(tmp_path, url, imap=imap_account, smtp=smtp_server,
                          listener_port=listener, security=TRUSTED)
    assert maildesk(config, "db", "upgrade").returncode == 0
    added = maildesk(config, "agents", "add", "--email", AGENT, "--name", "Alice Martin",
                     "--region", "eu")
    assert added.returncode == 0, added.stderr
    imap, relay = f"127.0.0.1:{imap_account.port} (tls none)", f"127.0.0.1:{smtp_server.port}"
    expected = [
        f"ok    store: sqlite, schema at revision {HEAD}",
        f"ok    imap: logged in as {imap_account.username} at {imap}; watching INBOX; "
        "maildesk/processed {0}, maildesk/quarantine {0}",
        f"ok    relay: {relay} (tls none) answered EHLO, QUIT; no mail sent",
        f"ok    listener: 127.0.0.1:{listener} is free (smtp)",
        "ok    agents: 1 active (1 EU, 0 US)",
        "ok    trust: Authentication-Results of mx.desk.example are believed",
    ]
    # The first check creates the two folders, as the daemon would; the second finds them.
    for state in ("created", "exists"):
        result = maildesk(config, "check")
        assert (result.returncode, result.stderr) == (0, "")
        assert result.stdout.splitlines() == [line.format(state) for line in expected]
    with imap_account.client() as client:
        assert client.folder_exists("maildesk/processed")
        assert client.folder_exists("maildesk/quarantine")
    assert (smtp_server.connections, smtp_server.attempts) == (2, [])


def test_a_broken_config_names_every_failure_and_exits_1(
    tmp_path: Path, imap_account: ImapAccount, other_server: int
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    # The file exists but holds no schema, as after a `db upgrade` that was never run.
    sqlite3.connect(state / "maildesk.sqlite3").close()
    closed_relay = RecordingSMTPServer()
    closed_relay.port = free_port()  # Never started: nothing listens there.
    wrong = dataclasses.replace(imap_account, password="not-the-password-4711")
    config = write_config(tmp_path, f"sqlite:///{state / 'maildesk.sqlite3'}", imap=wrong,
                          smtp=closed_relay, listener_port=other_server)
    result = maildesk(config, "check")
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        f"FAIL  store: sqlite, the database schema is out of date (empty, this maildesk needs "
        f"{HEAD}); run `maildesk db upgrade` first",
        f"FAIL  imap: login refused for user {imap_account.username}",
        f"FAIL  relay: cannot connect to 127.0.0.1:{closed_relay.port} (tls none): "
        "connection refused",
        f"FAIL  listener: 127.0.0.1:{other_server} is in use by something else "
        "(it says '220 mx.other.example ESMTP Postfix')",
        "skip  agents: not checked: the store cannot be used",
        f"warn  trust: {TRUST_WARNING}",
    ]
    assert "not-the-password-4711" not in result.stdout + result.stderr


def test_a_missing_database_is_a_finding_and_is_not_created(
    tmp_path: Path, smtp_server: RecordingSMTPServer
) -> None:
    path = tmp_path / "state" / "maildesk.sqlite3"
    config = write_config(tmp_path, f"sqlite:///{path}", imap=None, smtp=smtp_server,
                          listener_port=free_port(), security=TRUSTED)
    result = maildesk(config, "check")
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == (
        f"FAIL  store: sqlite, the database {path} does not exist; create it with "
        "`maildesk db upgrade`"
    )
    assert "skip  imap: [imap] enabled = false" in result.stdout.splitlines()
    assert not path.exists()


def test_a_bad_config_is_one_message_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[imap]\nport = "abc"\n', encoding="utf-8")
    result = maildesk(config, "check")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f'{config}: [imap] port: expected an integer, got "abc"\n'


def test_agents_warn_without_an_active_agent_then_without_an_eu_one(
    tmp_path: Path, smtp_server: RecordingSMTPServer
) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    config = write_config(tmp_path, url, imap=None, smtp=smtp_server, listener_port=free_port())
    engine = database.make_engine(url)
    database.upgrade(engine)
    settings = load_settings(config)
    assert [f.line for f in probe_agents(settings)] == [
        "warn  agents: no active agent; new tickets reach nobody"
    ]
    with database.session_scope(engine) as session:
        directory.add_agent(session, email=AGENT, name="Alice", region="eu", actor="test")
        directory.add_agent(session, email="bob@vendor.example", name="Bob", region="us",
                            actor="test")
        directory.deactivate_agent(session, email=AGENT, actor="test")
    engine.dispose()
    assert [f.line for f in probe_agents(settings)] == [
        "warn  agents: no active EU agent; tickets of companies without after-hours support "
        "reach nobody"
    ]


def test_the_listener_port_held_by_a_running_maildesk_is_recognised(
    tmp_path: Path, smtp_server: RecordingSMTPServer
) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    with running_desk(tmp_path, url, imap=None, smtp=smtp_server) as desk:
        [finding] = probe_listener(load_settings(desk.config))
    assert finding.line == (
        f"ok    listener: 127.0.0.1:{desk.listener_port} is in use by a running maildesk "
        "(220 desk.example maildesk)"
    )


def test_a_port_that_cannot_be_bound_fails_with_the_reason(
    tmp_path: Path, smtp_server: RecordingSMTPServer
) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    # 192.0.2.1 (TEST-NET-1) is an address that no interface of this host has.
    config = write_config(tmp_path, url, imap=None, smtp=smtp_server, listener_port=2525)
    config.write_text(config.read_text().replace('host = "127.0.0.1"\nport = 2525',
                                                  'host = "192.0.2.1"\nport = 2525'))
    [finding] = probe_listener(load_settings(config))
    assert finding.line == (
        "FAIL  listener: cannot listen on 192.0.2.1:2525: cannot assign requested address"
    )
