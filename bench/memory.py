"""Memory benchmark: peak RSS of the daemon and its parse child over a backlog with large mails.

Run `.venv/bin/python bench/memory.py [-n 10000] [--store sqlite|postgres]`. The INBOX gets N mails
that open tickets: most plain, 10% with a 20-200 KB PDF, 1% with an attachment of 1 to 20 MB
(the mail's size limit is raised to 30 MiB for the run, so that a 20 MB attachment, base64
encoded, is filed rather than refused). Mails are generated and APPENDed one at a time, so the
benchmark itself holds only one. While `maildesk run` drains the INBOX, /proc/<pid>/status is
read every 20 ms for the daemon and each parse child: VmHWM of each, and the largest sum of
their VmRSS at one instant. The baseline is the peak RSS (VmHWM) of a bare process doing the
FETCH by 50 + parse + walk of the same INBOX.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

from benchlib import Daemon, Rig, bench_main, make_desk, new_ticket_mail, sampler, wait_drained

BASELINE = """
import sys
sys.path.insert(0, sys.argv[1])
from benchlib import ImapAccount, fetch_parse_baseline
fetch_parse_baseline(ImapAccount(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]))
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) // 1024)
"""


def status_mib(pid: int, key: str) -> int:
    """A VmHWM/VmRSS line of /proc/<pid>/status in MiB (0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def child_kind(pid: int) -> str:
    """Which of the daemon's children a process is: "parse" or "compose" (by its command), or
    "" when it runs neither (yet) or is gone."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    if b"compose_child" in command:
        return "compose"
    return "parse" if b"mail.worker" in command else ""


def run(args: argparse.Namespace, rig: Rig) -> int:
    """Fill, measure the bare process, drain under the sampler; the exit code."""
    rig.start()
    rng = random.Random(args.seed)
    imap = rig.account()
    config, engine, accounts = make_desk(rig, rig.base / "desk", imap=imap,
                                         limits=f"max_mail_bytes = {30 * 1024 * 1024}\n")
    total = large = 0
    with imap.client() as client:
        for _ in range(args.n):
            roll = rng.random()
            attachment = None
            if roll < 0.01:
                large += 1
                attachment = rng.randbytes(rng.randint(1_000_000, 20_000_000))
            elif roll < 0.11:
                attachment = rng.randbytes(rng.randint(20_000, 200_000))
            raw = new_ticket_mail(accounts, rng, attachment)[0].as_bytes()
            total += len(raw)
            client.append("INBOX", raw)
    bare = subprocess.run(
        [sys.executable, "-c", BASELINE, str(Path(__file__).parent), imap.host, str(imap.port),
         imap.username, imap.password], capture_output=True, text=True, check=True,
    )
    baseline = int(bare.stdout.split()[-1])
    daemon = Daemon(config, rig.base / "desk" / "maildesk.log")
    peaks: dict[int, int] = {}
    kinds: dict[int, str] = {}
    together = [0]
    timeline: list[int] = []  # The daemon's VmRSS at each sample.

    def read() -> None:
        if daemon.proc is None or daemon.proc.poll() is not None:
            return
        pids = [daemon.pid]
        for pid in daemon.children():
            # A child between fork and exec still maps the daemon's pages (shared, not more
            # memory, and its VmHWM says the daemon's): it counts once it runs its own code.
            kinds[pid] = kinds.get(pid) or child_kind(pid)
            if kinds[pid]:
                pids.append(pid)
        for pid in pids:
            peaks[pid] = max(peaks.get(pid, 0), status_mib(pid, "VmHWM"))
        together[0] = max(together[0], sum(status_mib(pid, "VmRSS") for pid in pids))
        timeline.append(status_mib(daemon.pid, "VmRSS"))

    started = time.monotonic()
    with sampler(read):
        daemon.start(wait=False)
        rig.cleanup.callback(daemon.kill)
        wait_drained(daemon, imap, engine, rig.smtp, started + args.timeout)
        read()
    seconds = time.monotonic() - started
    code = daemon.stop()
    own = peaks.pop(daemon.pid, 0)
    child = max(peaks.values(), default=0)
    figure = own + child
    by_kind: dict[str, int] = {}
    for pid, peak in peaks.items():
        by_kind[kinds[pid]] = max(by_kind.get(kinds[pid], 0), peak)
    print(f"maildesk memory benchmark ({args.store}): N={args.n} mails, {total / 1e6:.0f} MB, "
          f"{large} with an attachment of 1-20 MB; drained in {seconds:.0f} s")
    print(f"  baseline: bare FETCH by 50 + parse, peak RSS {baseline} MiB")
    print(f"  maildesk: daemon peak {own} MiB + largest child peak {child} MiB "
          f"({len(peaks)} children) = {figure} MiB  ratio {figure / baseline:.2f}  "
          "[target <= 150 MB]")
    print("  children's peaks: " + ", ".join(f"{k} {v} MiB" for k, v in sorted(by_kind.items())))
    print(f"  maildesk: largest sum of RSS at one instant {together[0]} MiB")
    if timeline:
        tenths = [timeline[min(len(timeline) - 1, len(timeline) * k // 10)] for k in range(11)]
        highest = max(range(len(timeline)), key=timeline.__getitem__)
        print("  maildesk: daemon RSS at each tenth of the run (MiB): "
              + " ".join(str(v) for v in tenths)
              + f"; highest {timeline[highest]} at {highest * 100 // len(timeline)}%")
    print(f"  maildesk exited with {code} after SIGTERM")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(bench_main(__doc__.splitlines()[0], 10000, run))
