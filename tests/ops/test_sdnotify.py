"""systemd's notification protocol, against a real AF_UNIX datagram socket bound by the test."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rig.dovecot import free_port

from maildesk.ops import sdnotify


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket on a path, as systemd binds one, and its $NOTIFY_SOCKET value."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield sock, str(path)


def test_notify_sends_one_datagram_to_the_socket_path(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert sdnotify.notify("READY=1")
    assert sock.recv(4096) == b"READY=1"


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"maildesk-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_does_nothing_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.notify("READY=1")


def test_a_socket_that_is_gone_is_no_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not sdnotify.notify("READY=1")


@pytest.mark.parametrize(
    ("usec", "pid", "interval"),
    [("20000000", None, 10.0), ("20000000", "self", 10.0), ("20000000", "1", None),
     ("0", None, None), (None, None, None), ("abc", None, None)],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    usec: str | None, pid: str | None, interval: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert sdnotify.watchdog_interval() == interval


async def test_watchdog_pings_until_stopped(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    stop = asyncio.Event()
    task = asyncio.create_task(sdnotify.watchdog(stop))
    loop = asyncio.get_running_loop()
    pings = [await loop.run_in_executor(None, sock.recv, 4096) for _ in range(3)]
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    assert pings == [b"WATCHDOG=1"] * 3


async def test_watchdog_without_systemd_waits_for_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stage task that ends stops the daemon: without a watchdog this one must keep waiting.
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    stop = asyncio.Event()
    task = asyncio.create_task(sdnotify.watchdog(stop))
    await asyncio.sleep(0)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, timeout=5)


def test_the_daemon_says_ready_then_pings_then_stopping(
    notify_socket: tuple[socket.socket, str], tmp_path: Path
) -> None:
    sock, address = notify_socket
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[desk]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[listener]\nhost = "127.0.0.1"\nport = {port}\n[smtp]\ntransport = "maildir"\n',
        encoding="utf-8",
    )
    maildesk = [sys.executable, "-m", "maildesk", "--config", str(config)]
    subprocess.run([*maildesk, "db", "upgrade"], check=True, capture_output=True)
    log = tmp_path / "maildesk.log"
    # As systemd starts it: its socket, and a watchdog of 0.2 s (a ping every 0.1 s).
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
    env.pop("WATCHDOG_PID", None)
    process = subprocess.Popen(
        [*maildesk, "run"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    try:
        sock.settimeout(30)
        first = sock.recv(4096)
        # Ready means the stages run: the listener takes a connection at once.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            assert client.recv(100).startswith(b"220 ")
        then = [sock.recv(4096) for _ in range(2)]
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert first == b"READY=1", log.read_text()
    assert then == [b"WATCHDOG=1"] * 2
    rest = []
    sock.settimeout(0)
    while True:
        try:
            rest.append(sock.recv(4096))
        except BlockingIOError:
            break
    assert rest[-1:] == [b"STOPPING=1"]
    assert set(rest[:-1]) <= {b"WATCHDOG=1"}
    assert code == 0, log.read_text()
