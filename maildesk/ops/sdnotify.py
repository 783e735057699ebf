"""systemd's notification protocol: READY=1, WATCHDOG=1 and STOPPING=1 as datagrams.

The service manager names an AF_UNIX datagram socket in $NOTIFY_SOCKET (a path, or an abstract
socket written with a leading "@"); each state is one datagram of `KEY=value` lines. Without
the variable, outside systemd, every call does nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket

from maildesk.logs import get_logger

log = get_logger("sdnotify")


def notify(state: str) -> bool:
    """Send `state` (for example "READY=1") to the service manager; False if none listens."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        # An abstract socket: its name starts with a NUL byte instead of the "@".
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), address)
    except OSError as exc:
        # systemd restarts a service that never says it is ready, or stops pinging its
        # watchdog; the log says why.
        log.warning("cannot notify the service manager", state=state, error=exc.strerror)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between two watchdog pings (half of $WATCHDOG_USEC), or None without one."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # The watchdog is another process's (ours started it, say).
    return int(usec) / 1_000_000 / 2


async def watchdog(stop: asyncio.Event) -> None:
    """Ping systemd's watchdog from the event loop until `stop` is set."""
    interval = watchdog_interval()
    if interval is None:
        # A stage task that ends stops the daemon, so this one waits like the others.
        await stop.wait()
        return
    while not stop.is_set():
        notify("WATCHDOG=1")
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass
