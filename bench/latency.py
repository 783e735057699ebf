"""Latency benchmark: one mail at a time into an idle daemon, until its acknowledgement is sent.

Run `.venv/bin/python bench/latency.py [-n 100] [--interval 0.3] [--store sqlite|postgres]`.
Two paths, each against a bare baseline measured in the same run on the same servers:

- IMAP: from the start of the APPEND to the desk's INBOX until the acknowledgement is accepted
  by the SMTP sink, against a bare imapclient IDLE loop's APPEND-to-EXISTS delay (another user
  of the same Dovecot, measured before maildesk starts).
- listener: from connecting to the listener until its 250 after DATA, and until the
  acknowledgement reaches the sink, against a bare smtplib send of the same mail to the sink.

Mails go one at a time at a steady rate, each only once the daemon idles again (its IMAP
session in IDLE); every mail opens a ticket, from one of the seeded people.
"""

from __future__ import annotations

import argparse
import random
import smtplib
import statistics
import sys
import threading
import time
from collections.abc import Callable

from benchlib import (
    BenchError,
    Daemon,
    ImapAccount,
    Rig,
    bench_main,
    free_port,
    make_desk,
    new_ticket_mail,
    percentile,
    spread,
)


class IdleWatcher:
    """A bare imapclient IDLE loop on an INBOX, noting when each EXISTS arrives."""

    def __init__(self, imap: ImapAccount) -> None:
        """Connect and select; start() begins idling."""
        self.imap = imap
        self.exists = threading.Event()
        self.at = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.ready = threading.Event()

    def _loop(self) -> None:
        with self.imap.client() as client:
            client.select_folder("INBOX")
            while not self.stop.is_set():
                client.idle()
                self.ready.set()
                while not self.stop.is_set():
                    responses = client.idle_check(timeout=0.2)
                    if any(len(r) > 1 and r[1] == b"EXISTS" for r in responses):
                        self.at = time.monotonic()
                        self.exists.set()
                        break
                self.ready.clear()
                client.idle_done()

    def delays(self, n: int, make: Callable[[], bytes], interval: float) -> list[float]:
        """APPEND n mails, one per `interval`; each APPEND-to-EXISTS delay in milliseconds."""
        self.thread.start()
        found: list[float] = []
        with self.imap.client() as appender:
            for _ in range(n):
                tick = time.monotonic() + interval
                if not self.ready.wait(5):
                    raise BenchError("the bare IDLE loop never went idle")
                raw = make()
                self.exists.clear()
                started = time.monotonic()
                appender.append("INBOX", raw)
                if not self.exists.wait(10):
                    raise BenchError("the bare IDLE loop saw no EXISTS within 10 s")
                found.append((self.at - started) * 1000)
                time.sleep(max(0.0, tick - time.monotonic()))
        self.stop.set()
        self.thread.join(timeout=5)
        return found


def wait_idle(rig: Rig, daemon: Daemon, timeout: float = 10) -> None:
    """Wait until the daemon's IMAP session is in IDLE."""
    assert rig.dovecot is not None
    deadline = time.monotonic() + timeout
    while rig.dovecot.idling_sessions() < 1:
        daemon.check_alive()
        if time.monotonic() > deadline:
            raise BenchError("maildesk's IMAP session did not go back to IDLE")
        time.sleep(0.005)


def wait_ack(rig: Rig, daemon: Daemon, message_id: str, timeout: float = 30) -> float:
    """When the acknowledgement of `message_id` reached the sink (monotonic)."""
    deadline = time.monotonic() + timeout
    while True:
        at = rig.smtp.acknowledged().get(message_id)
        if at is not None:
            return at
        daemon.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"no acknowledgement of {message_id} within {timeout} s")
        time.sleep(0.001)


def smtp_send(port: int, mail_from: str, to: str, raw: bytes) -> tuple[float, float]:
    """One SMTP session on a new connection: when DATA began and when its 250 came."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        client.mail(mail_from)
        client.rcpt(to)
        data = time.monotonic()
        code, reply = client.data(raw)
        done = time.monotonic()
    if code != 250:
        raise BenchError(f"port {port} answered {code} {reply!r} to DATA")
    return data, done


def line(name: str, values: list[float], base: list[float] | None = None,
         target: str = "") -> None:
    """Print one distribution, with its ratio to the baseline's p50 and the target."""
    text = f"  {name:<44} {spread(values, ' ms')}"
    if base:
        over = statistics.median(values) - statistics.median(base)
        text += (f"  ratio {statistics.median(values) / statistics.median(base):.2f} "
                 f"(p50 +{over:.1f} ms, p99 +{percentile(values, .99) - percentile(base, .99):.1f}"
                 " ms)")
    if target:
        text += f"  [target {target}]"
    print(text)


def run(args: argparse.Namespace, rig: Rig) -> int:
    """Both paths, each against its baseline; the exit code."""
    rig.start()
    rng = random.Random(args.seed)
    port = free_port()
    imap, bare = rig.account(), rig.account()
    config, _engine, accounts = make_desk(rig, rig.base / "desk", imap=imap, listener_port=port)

    def mail() -> tuple[bytes, str, str]:
        message, _ = new_ticket_mail(accounts, rng)
        sender = message["From"].addresses[0].addr_spec
        return message.as_bytes(), str(message["Message-ID"]), sender

    idle = IdleWatcher(bare).delays(args.n, lambda: mail()[0], args.interval)
    sink: list[float] = []
    sink_data: list[float] = []
    for _ in range(args.n):
        raw, _, sender = mail()
        started = time.monotonic()
        data, done = smtp_send(rig.smtp.port, sender, "someone@desk.example", raw)
        sink.append((done - started) * 1000)
        sink_data.append((done - data) * 1000)
    daemon = Daemon(config, rig.base / "desk" / "maildesk.log")
    rig.cleanup.callback(daemon.kill)
    for attempt in range(3):
        try:
            daemon.start()
            break
        except BenchError as exc:
            # free_port() found the port free a while ago: another process (an outgoing
            # connection's source port, a test beside this one) may hold it by now.
            if "address already in use" not in str(exc) or attempt == 2:
                raise
            taken, port = port, free_port()
            config.write_text(config.read_text().replace(f"port = {taken}\n", f"port = {port}\n"))

    via_imap: list[float] = []
    with imap.client() as appender:
        for _ in range(args.n):
            tick = time.monotonic() + args.interval
            wait_idle(rig, daemon)
            raw, message_id, _ = mail()
            started = time.monotonic()
            appender.append("INBOX", raw)
            via_imap.append((wait_ack(rig, daemon, message_id) - started) * 1000)
            time.sleep(max(0.0, tick - time.monotonic()))
    to_250: list[float] = []
    data_250: list[float] = []
    to_ack: list[float] = []
    for _ in range(args.n):
        tick = time.monotonic() + args.interval
        raw, message_id, sender = mail()
        started = time.monotonic()
        data, done = smtp_send(port, sender, "support@desk.example", raw)
        to_250.append((done - started) * 1000)
        data_250.append((done - data) * 1000)
        to_ack.append((wait_ack(rig, daemon, message_id) - started) * 1000)
        time.sleep(max(0.0, tick - time.monotonic()))
    code = daemon.stop()

    print(f"maildesk latency benchmark ({args.store}): {args.n} mails per path, one every "
          f"{args.interval * 1000:.0f} ms into an idle daemon")
    print(" IMAP (Dovecot, IDLE)")
    line("baseline: bare IDLE loop, APPEND to EXISTS", idle)
    line("maildesk: APPEND to acknowledgement at sink", via_imap, idle,
         "p50 <= +50 ms, p99 <= +300 ms")
    print(" listener (SMTP)")
    line("baseline: bare smtplib session to the sink", sink)
    line("maildesk: session to the listener's 250", to_250, sink, "p50 <= 10 ms")
    line("baseline: bare smtplib, DATA to 250", sink_data)
    line("maildesk: DATA to the listener's 250", data_250, sink_data, "p50 <= 10 ms")
    line("maildesk: session start to ack at sink", to_ack, sink,
         "p50 <= 30 ms, p99 <= 100 ms")
    print(f"  maildesk exited with {code} after SIGTERM")
    return 0 if code == 0 else 1


def options(parser: argparse.ArgumentParser) -> None:
    """The pace."""
    parser.add_argument("--interval", type=float, default=0.3,
                        help="seconds between two mails (default 0.3)")


if __name__ == "__main__":
    sys.exit(bench_main(__doc__.splitlines()[0], 100, run, options))
