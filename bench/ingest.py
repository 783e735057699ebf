"""Backlog benchmark: how fast `maildesk run` drains a full IMAP inbox, against a raw baseline.

Run `.venv/bin/python bench/ingest.py [-n 2000] [--store sqlite|postgres]`. It starts the test
rig's Dovecot and recording SMTP server (and PostgreSQL for that store), fills the INBOX with a
realistic mix of mails, measures a baseline (imapclient FETCH by 50 plus the email package's
parser and a walk of the parts, in this process), then times `maildesk run` until the INBOX is
empty and every acknowledgement and notification has reached the SMTP server. It prints figures
and checks that no mail was lost or doubled; it never asserts a speed target.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from benchlib import (
    Daemon,
    ImapAccount,
    Plan,
    Rig,
    TimedSMTPServer,
    attach_py_spy,
    bench_main,
    fetch_parse_baseline,
    fill,
    generate,
    log_events,
    make_desk,
    spread,
    wait_drained,
)
from sqlmodel import select

from maildesk.store import database
from maildesk.store.models import InboundMail, Outbox, Ticket

# cProfile sees only the thread that enabled it, and maildesk files every mail in worker threads
# (asyncio.to_thread), so each new thread gets a profiler of its own and all are merged at exit.
PROFILED_MAIN = """
import cProfile, pstats, sys, threading
from maildesk.cli.main import main
profiles = []
def start(*_):
    profiles.append(cProfile.Profile())
    profiles[-1].enable()
threading.setprofile(start)
start()
try:
    code = main(sys.argv[2:])
finally:
    stats = pstats.Stats(profiles[0])
    for profile in profiles[1:]:
        try:
            stats.add(profile)
        except TypeError:
            pass  # A thread that never ran Python code has no stats to merge.
    stats.dump_stats(sys.argv[1])
sys.exit(code)
"""
@dataclass
class Measures:
    """What the run measured, in seconds from maildesk's start unless said otherwise."""

    fill: float  # APPENDing the mails, not timed against anything
    baseline: float  # mails per second
    startup: float  # until the "started" log line
    empty: float  # until the INBOX was seen empty
    done: float  # until the last outgoing mail reached the SMTP server


def existing(engine: sa.Engine) -> tuple[int, int, int]:
    """The largest ticket, inbound and outbox ids before the run (0 in an empty store)."""
    with engine.connect() as conn:
        return tuple(  # type: ignore[return-value]
            conn.execute(sa.select(sa.func.coalesce(sa.func.max(model.id), 0))).scalar_one()
            for model in (Ticket, InboundMail, Outbox)
        )


def check(plan: Plan, engine: sa.Engine, imap: ImapAccount, smtp: TimedSMTPServer,
          events: list[dict[str, Any]], before: tuple[int, int, int] = (0, 0, 0),
          ) -> tuple[list[tuple[bool, str]], Counter[str], list[float]]:
    """Compare what maildesk stored and sent with the plan (rows after `before`'s ids).

    Returns the checks, the Outbox rows by kind, and how long each acknowledgement waited in
    the Outbox (seconds from its commit to its delivery), sorted.
    """
    planned = Counter(plan.kinds.values())
    ticket0, inbound0, outbox0 = before
    with database.session_scope(engine) as session:
        rows = {row.message_id: row for row in session.exec(
            select(InboundMail).where(InboundMail.id > inbound0))}  # type: ignore[operator]
        inbound = session.exec(select(sa.func.count()).select_from(InboundMail)
                               .where(InboundMail.id > inbound0)).one()  # type: ignore[operator]
        tickets = session.exec(select(sa.func.count()).select_from(Ticket)
                               .where(Ticket.id > ticket0)).one()  # type: ignore[operator]
        outbox = session.exec(select(Outbox.kind, Outbox.created_at, Outbox.sent_at)
                              .where(Outbox.id > outbox0)).all()  # type: ignore[operator]
    kinds = Counter(kind for kind, _, _ in outbox)
    waits = sorted((sent - created).total_seconds() for kind, created, sent in outbox
                   if kind == "acknowledgement" and sent is not None)
    expected_kinds = Counter(acknowledgement=planned["ticket"], new_ticket=2 * planned["ticket"],
                             followup=2 * planned["followup"], unknown_sender=len(plan.strangers))
    outcome = {"ticket": "ticket", "followup": "followup", "unknown": "quarantined"}
    wrong = [mid for mid, kind in plan.kinds.items()
             if mid not in rows or rows[mid].outcome != outcome[kind]]
    astray = [mid for mid, parent in plan.parents.items() if mid in rows and parent in rows
              and rows[mid].ticket_id != rows[parent].ticket_id]
    sent_ids = [m.message["Message-ID"] for m in smtp.mails]
    with imap.client() as client:
        folders = {name: client.folder_status(name, [b"MESSAGES"])[b"MESSAGES"]
                   for name in ("INBOX", "maildesk/processed", "maildesk/quarantine")}
    logged = sum(e.get("event") == "mail processed" for e in events)
    checks = [
        (inbound == len(plan.raws) == len(rows), f"InboundMail rows {inbound} == N, no doubles"),
        (not wrong, f"every mail has its planned outcome ({len(wrong)} wrong)"),
        (tickets == planned["ticket"], f"tickets {tickets} == new-ticket mails"),
        (not astray, f"every follow-up landed on its parent's ticket ({len(astray)} astray)"),
        (kinds == expected_kinds, f"Outbox rows by kind as expected: {dict(kinds)}"),
        (len(sent_ids) == len(set(sent_ids)) == kinds.total(),
         f"SMTP got {len(sent_ids)} mails, {len(set(sent_ids))} distinct, == Outbox rows"),
        (folders["INBOX"] == 0, f"INBOX empty ({folders['INBOX']})"),
        (folders["maildesk/processed"] == planned["ticket"] + planned["followup"],
         f"processed folder holds the {folders['maildesk/processed']} filed mails"),
        (folders["maildesk/quarantine"] == planned["unknown"],
         f"quarantine folder holds the {folders['maildesk/quarantine']} strangers' mails"),
        (logged == len(plan.raws), f'{logged} "mail processed" log lines == N'),
    ]
    return checks, kinds, waits or [0.0]


def report(n: int, plan: Plan, measures: Measures, events: list[dict[str, Any]],
           checks: list[tuple[bool, str]], kinds: Counter[str], waits: list[float],
           store: str) -> None:
    """Print the figures and the checks."""
    m = measures
    planned = Counter(plan.kinds.values())
    processed = [e for e in events if e.get("event") == "mail processed"]
    outcomes = Counter(e.get("outcome") for e in processed)
    millis = sorted(float(e.get("ms", 0)) for e in processed) or [0.0]
    troubles = Counter(f"{e.get('level')}: {e.get('event')}" for e in events
                       if e.get("level") in ("warning", "error", "critical"))
    rate, rate_up = n / m.done, n / (m.done - m.startup)
    print(f"maildesk backlog benchmark ({store}): N={n}, {sum(map(len, plan.raws)) / 1e6:.1f} MB "
          f"(INBOX filled in {m.fill:.1f} s, not timed)")
    print(f"  mix: {planned['ticket']} new tickets ({plan.attachments} with a PDF), "
          f"{planned['followup']} follow-ups, {planned['unknown']} mails from "
          f"{len(plan.strangers)} unknown senders")
    print(f"  baseline (FETCH by 50 + email parse, best of 2) {m.baseline:7.1f} mails/s")
    print(f"  maildesk end to end, {m.done:6.1f} s             {rate:7.1f} mails/s"
          f"  ratio {rate / m.baseline:.3f}")
    print(f"  maildesk after start-up, {m.done - m.startup:6.1f} s         {rate_up:7.1f} mails/s"
          f"  ratio {rate_up / m.baseline:.3f}  (start-up {m.startup:.2f} s)")
    print(f"  INBOX seen empty at {m.empty:.1f} s ({n / m.empty:.1f} mails/s filed), "
          f"last outgoing mail at {m.done:.1f} s")
    print(f"  ms from claim to commit per mail (log): {spread(millis)}")
    print(f"  acknowledgement s in Outbox: {spread(waits)}")
    print(f"  tickets {outcomes['ticket']}, follow-ups {outcomes['followup']}, quarantined "
          f"{outcomes['quarantined']}; outgoing mails {kinds.total()}")
    print(f"  log: mail processed {dict(outcomes)}; warnings/errors: {dict(troubles) or 'none'}")
    for ok, text in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {text}")




@dataclass
class Backlog:
    """One drained backlog: its plan, what was measured, and the checks."""

    plan: Plan
    measures: Measures
    checks: list[tuple[bool, str]]
    kinds: Counter[str]
    waits: list[float]
    events: list[dict[str, Any]]

    @property
    def rate(self) -> float:
        """Mails per second, end to end."""
        return len(self.plan.raws) / self.measures.done

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return all(ok for ok, _ in self.checks)


def drain_backlog(rig: Rig, name: str, args: argparse.Namespace, *,
                  prepare: Any = None, baseline: bool = True) -> Backlog:
    """A desk of its own (directory `name`), a filled INBOX, the baseline, and maildesk's run.

    `prepare(engine)` runs on the upgraded database before the desk is seeded (the scale
    benchmark fills it there).
    """
    deadline = time.monotonic() + args.timeout
    imap = rig.account()
    config, engine, accounts = make_desk(rig, rig.base / name, imap=imap, before_seed=prepare)
    plan = generate(args.n, accounts, random.Random(args.seed))
    before = existing(engine)
    filled = fill(imap, plan.raws)
    # Twice, keeping the better, so that the first pass warms Dovecot's caches for both sides.
    base_rate = max(fetch_parse_baseline(imap), fetch_parse_baseline(imap)) if baseline else 0.0
    command = None
    if getattr(args, "profile", None):
        command = [sys.executable, "-c", PROFILED_MAIN, str(Path(args.profile).resolve())]
    daemon = Daemon(config, rig.base / name / "maildesk.log", command)
    rig.smtp.clear()
    rig.smtp.stamps.clear()
    daemon.start(wait=False)
    rig.cleanup.callback(daemon.kill)
    spy = None
    if getattr(args, "py_spy", None):
        spy = attach_py_spy(daemon.pid, args.py_spy, rig.cleanup)
    empty, done = (at - daemon.began
                   for at in wait_drained(daemon, imap, engine, rig.smtp, deadline, before[2]))
    code = daemon.stop(timeout=120 if command or spy else 30)
    if spy is not None:
        spy.wait(timeout=120)
    events = log_events(daemon.log)
    checks, kinds, waits = check(plan, engine, imap, rig.smtp, events, before)
    checks.append((code == 0, f"maildesk exited with {code} after SIGTERM"))
    measures = Measures(filled, base_rate, daemon.started_after(), empty, done)
    return Backlog(plan, measures, checks, kinds, waits, events)


def run(args: argparse.Namespace, rig: Rig) -> int:
    """The backlog on one store, against the FETCH + parse baseline; the exit code."""
    rig.start()
    backlog = drain_backlog(rig, "desk", args)
    report(args.n, backlog.plan, backlog.measures, backlog.events, backlog.checks,
           backlog.kinds, backlog.waits, args.store)
    return 0 if backlog.ok else 1


def options(parser: argparse.ArgumentParser) -> None:
    """The profiling options."""
    parser.add_argument("--profile", metavar="PATH", help="profile the daemon into a pstats file")
    parser.add_argument("--py-spy", metavar="PATH",
                        help="record the daemon and its parse child with py-spy (.svg or .json)")


if __name__ == "__main__":
    sys.exit(bench_main(__doc__.splitlines()[0], 2000, run, options))
