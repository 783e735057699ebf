"""Bombs, end to end: each is quarantined with the bound it broke, the daemon stays small."""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

from e2e import CUSTOMER, DESK, running_desk
from rig.smtp import RecordingSMTPServer

HEAD = (f"From: Claire <{CUSTOMER}>\r\nTo: {DESK}\r\nSubject: bomb\r\n"
        "MIME-Version: 1.0\r\n").encode()


def multipart(parts: list[bytes], line_end: bytes = b"\r\n") -> bytes:
    body = b"".join(b"--b" + line_end + part + line_end for part in parts) + b"--b--" + line_end
    return HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + body


def nested(depth: int) -> bytes:
    opening = b"".join(
        f'--b{n}\r\nContent-Type: multipart/mixed; boundary="b{n + 1}"\r\n\r\n'.encode()
        for n in range(depth)
    )
    return HEAD + b'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n' + opening + b"x\r\n"


BOMBS = {
    "content-type parameters": HEAD + b"Content-Type: text/plain"
    + b"".join(b';\r\n p%d="v"' % n for n in range(60_000)) + b"\r\n\r\nx\r\n",
    "bare-CR attachments": multipart(
        [b"Content-Type: application/octet-stream\rContent-Disposition: attachment\r\rx"]
        * 20_000),
    "100,000 parts": multipart([b"Content-Type: text/plain\r\n\r\nx"] * 100_000),
    "10,000 deep": nested(10_000),
    "nested comments": HEAD.replace(
        b"Subject: bomb", b"Subject: bomb\r\nX-Note: " + b"(" * 900 + b"\r\n " + b"(" * 300
        + b")" * 600 + b"\r\n " + b")" * 600)
    + b"Content-Type: text/plain\r\n\r\nx\r\n",
    "punycode body": HEAD + b"Content-Type: text/plain; charset=punycode\r\n\r\n"
    + (b"a" * 998 + b"\r\n") * 2_000,
}


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def children(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in found]


def test_bombs_are_quarantined_the_daemon_stays_small_and_stops_in_time(
    tmp_path: Path, smtp_server: RecordingSMTPServer
) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    with running_desk(tmp_path, url, imap=None, smtp=smtp_server) as desk:
        assert desk.process is not None
        peaks = []
        with smtplib.SMTP("127.0.0.1", desk.listener_port, timeout=60) as client:
            for raw in BOMBS.values():
                client.sendmail(CUSTOMER, [DESK], raw)
                peaks.extend(peak_rss_kib(child) for child in children(desk.process.pid))
            normal = HEAD + b"Content-Type: text/plain\r\n\r\nBonjour, une vraie question.\r\n"
            client.sendmail(CUSTOMER, [DESK], normal.replace(b"bomb", b"question"))
        rows = sorted(desk.wait_for_inbound(len(BOMBS) + 1, timeout=60), key=lambda r: r.id or 0)
        # The punycode body is no bomb any more: it is read as UTF-8 and filed, like the
        # normal mail after it.
        assert [r.outcome for r in rows] == ["quarantined"] * (len(BOMBS) - 1) + ["ticket"] * 2
        assert [r.reason for r in rows[: len(BOMBS) - 1]] == [
            "malformed: header section too large (over 262144 bytes)",
            "malformed: too many MIME parts (over 500)",
            "malformed: too many MIME parts (over 500)",
            "malformed: nested too deep (over 20 levels)",
            "malformed: comments nested too deep (over 50 levels)",
        ]
        peaks.append(peak_rss_kib(desk.process.pid))
        assert max(peaks) < 512 * 1024, peaks
        started = time.monotonic()
        assert desk.stop() == 0
        # A bound on shutdown, as the issue sets it, not a measure of speed.
        assert time.monotonic() - started < 10
