"""Chaos benchmark: a backlog filed by a daemon SIGKILLed again and again, at chosen moments.

Run `.venv/bin/python bench/chaos.py [-n 1000] [--kills 50] [--store sqlite|postgres]`. The INBOX
holds N mails that each open a ticket; `maildesk run` is killed with SIGKILL at least `--kills`
times and restarted at once. Each life ends either at a random moment (an external SIGKILL after
0.05 to 0.9 s) or at one of the named moments, where the daemon kills itself:

- `before_move`: after a batch committed, before its IMAP MOVE;
- `during_move`: while the MOVE is on the wire;
- `after_250`: between the relay's 250 and the row being marked sent.

The named moments need no change in maildesk: the daemon is started through a small launcher
(LAUNCHER below) that wraps ImapConnection.move and SmtpTransport.send when the environment
variable MAILDESK_BENCH_KILL_AT names a moment (after MAILDESK_BENCH_KILL_SKIP such calls).

It reports mails lost, tickets doubled, the time from the last restart until every
acknowledgement was delivered, and how many acknowledgements were delivered twice and whether
always under the same Message-ID. The exit status is 1 if a mail was lost or a ticket doubled.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from collections import Counter

from benchlib import (
    BenchError,
    Daemon,
    Rig,
    bench_main,
    fill,
    make_desk,
    new_ticket_mail,
)
from sqlmodel import Session, select

from maildesk.store.models import InboundMail, Ticket

LAUNCHER = """
import os, signal, sys, threading
moment = os.environ.get("MAILDESK_BENCH_KILL_AT", "")
skip = [int(os.environ.get("MAILDESK_BENCH_KILL_SKIP", "0"))]

def due():
    skip[0] -= 1
    return skip[0] < 0

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if moment in ("before_move", "during_move"):
    from maildesk.ingress import imap
    original_move = imap.ImapConnection.move
    def move(self, uids, folder):
        if due():
            if moment == "before_move":
                die()
            # The command goes out; the kill comes before (or as) its answer is read.
            threading.Timer(0.0005, die).start()
        return original_move(self, uids, folder)
    imap.ImapConnection.move = move
elif moment == "after_250":
    from maildesk.outbound import transport
    original_send = transport.SmtpTransport.send
    def send(self, mail_from, recipients, raw):
        refused = original_send(self, mail_from, recipients, raw)
        if due():
            die()
        return refused
    transport.SmtpTransport.send = send
from maildesk.cli.main import main
sys.exit(main(sys.argv[1:]))
"""
MOMENTS = ("random", "before_move", "during_move", "after_250")


def run(args: argparse.Namespace, rig: Rig) -> int:
    """Fill, kill and restart, then wait for every acknowledgement; the exit code."""
    rig.start()
    rng = random.Random(args.seed)
    imap = rig.account()
    config, engine, accounts = make_desk(rig, rig.base / "desk", imap=imap)
    mails = [new_ticket_mail(accounts, rng)[0] for _ in range(args.n)]
    ids = {str(m["Message-ID"]): str(m["Subject"]) for m in mails}
    fill(imap, [m.as_bytes() for m in mails])
    daemon = Daemon(config, rig.base / "desk" / "maildesk.log",
                    [sys.executable, "-c", LAUNCHER])
    rig.cleanup.callback(daemon.kill)
    ended: Counter[str] = Counter()
    kills = 0
    while kills < args.kills:
        moment = MOMENTS[kills % len(MOMENTS)]
        env = {"MAILDESK_BENCH_KILL_AT": "" if moment == "random" else moment,
               "MAILDESK_BENCH_KILL_SKIP": str(rng.randint(0, 2))}
        # At a named moment the daemon may die before its "started" line: no wait for it.
        daemon.start(env=env, wait=moment == "random")
        assert daemon.proc is not None
        if moment == "random":
            time.sleep(rng.uniform(0.05, 0.9))
        else:
            # The daemon kills itself at its moment; one that never comes (no mail left to
            # move or send) ends with an external SIGKILL after a while.
            try:
                daemon.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                moment = f"{moment} not reached (killed at 3 s)"
        daemon.kill()
        if daemon.proc.returncode not in (-9, 0):
            raise BenchError(f"maildesk exited with {daemon.proc.returncode}:\n{daemon.tail()}")
        ended[moment] += 1
        kills += 1
    daemon.start()
    restarted = time.monotonic()
    deadline = restarted + args.timeout
    while len(set(rig.smtp.acknowledgements()) & set(ids)) < len(ids):
        daemon.check_alive()
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    delivered_in = time.monotonic() - restarted
    acks = {parent: found for parent, found in rig.smtp.acknowledgements().items()
            if parent in ids}
    code = daemon.stop()
    with Session(engine) as session:
        inbound = session.exec(select(InboundMail)).all()
        tickets = len(session.exec(select(Ticket.id)).all())
    filed = Counter(row.message_id for row in inbound if row.outcome == "ticket")
    lost = len(set(ids) - set(filed))
    # Subjects may repeat in the mix: a ticket is doubled when one mail opened two, by rows or
    # by tickets beyond one per filed mail.
    doubled = sum(count - 1 for count in filed.values()) + max(0, tickets - len(filed))
    twice = sum(len(found) > 1 for found in acks.values())
    same_id = all(len(set(found)) == 1 for found in acks.values())
    unacknowledged = len(ids) - len(acks)
    print(f"maildesk chaos benchmark ({args.store}): N={args.n} mails, {kills} SIGKILLs "
          f"and restarts")
    print("  lives ended: " + ", ".join(f"{name} {count}" for name, count in ended.items()))
    print(f"  mails lost {lost}  [target 0]")
    print(f"  tickets doubled {doubled}  [target 0]")
    print(f"  every acknowledgement delivered {delivered_in:.1f} s after the last restart"
          f"{'' if not unacknowledged else f' (NOT: {unacknowledged} missing)'}"
          "  [target <= 30 s]")
    print(f"  acknowledgements delivered twice {twice}, always under the same Message-ID: "
          f"{'yes' if same_id else 'NO'}")
    print(f"  maildesk exited with {code} after SIGTERM")
    return 0 if lost == doubled == unacknowledged == 0 and same_id and code == 0 else 1


def options(parser: argparse.ArgumentParser) -> None:
    """How many kills."""
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs (default 50)")


if __name__ == "__main__":
    sys.argv[0] = __file__
    sys.exit(bench_main(__doc__.splitlines()[0], 1000, run, options))
