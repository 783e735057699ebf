"""Ingest benchmark: how fast `maildesk run` drains a full IMAP inbox, against a raw baseline.

Run `.venv/bin/python bench/ingest.py [-n 2000]`. It starts the test rig's Dovecot and recording
SMTP server, fills the INBOX with a realistic mix of mails, measures a baseline (imapclient FETCH
plus the email package's parser, in this process), then times `maildesk run` until the INBOX is
empty and every outgoing mail has reached the SMTP server. It prints figures and checks that no
mail was lost or doubled; it never asserts a speed target.
"""

from __future__ import annotations

import argparse
import contextlib
import email
import email.policy
import html
import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlmodel import select

from maildesk.store import database, directory
from maildesk.store.models import InboundMail, Outbox, Ticket

# The rig lives in tests/, which is no package: put it on the path, as the test suite does.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from rig.dovecot import DovecotServer, ImapAccount, die_with_parent
from rig.smtp import RecordingSMTPServer

DESK = "support@desk.example"
# Company -> (mail domain, after-hours support, its people's locale).
COMPANIES = {"Durand Industrie": ("durand.example", False, "fr"),
             "Northwind Ltd": ("northwind.example", True, "en")}
AGENTS = {"alice.martin@vendor.example": "Alice Martin",
          "jean.moreau@vendor.example": "Jean Moreau"}
FIRST = ["Claire", "Marc", "Élodie", "Hugo", "Zoé", "Lucas", "Anaïs", "Tom", "Inès", "Paul"]
LAST = ["Dupont", "Petit", "Lefèvre", "Smith", "Garçon", "Brown", "Müller", "Roux", "Nguyen", "Lee"]
SUBJECTS = {
    "fr": ["Problème d'accès à l'export", "Facture reçue en double", "Écran figé après la MàJ",
           "Accès refusé au module congés", "Clôture mensuelle impossible", "Lenteurs à l'accueil"],
    "en": ["Cannot log in since this morning", "PDF export fails", "Duplicate invoice received",
           "Question about the monthly close", "Dashboard is very slow", "Password reset e-mail"],
}
PARAGRAPHS = {
    "fr": ["Bonjour,", "Depuis ce matin l'export échoue avec une erreur générique.",
           "Pourriez-vous regarder ce qui se passe ? Plusieurs collègues sont bloqués.",
           "Nous avons déjà vidé le cache du navigateur, sans succès.", "Merci d'avance,"],
    "en": ["Hello,", "Since this morning the export fails with a generic error.",
           "Could you have a look? Several colleagues are blocked.",
           "We already cleared the browser cache, to no avail.", "Thanks in advance,"],
}
REPLIES = {"fr": ("Toujours le même problème aujourd'hui, avez-vous du nouveau ?", "a écrit :"),
           "en": ("Still the same problem today, any news?", "wrote:")}
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


class BenchError(Exception):
    """The benchmark could not complete; the message says why."""


@dataclass
class Plan:
    """The generated mails, in INBOX order, and what should become of each."""

    raws: list[bytes] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)  # Message-ID -> ticket/followup/unknown
    parents: dict[str, str] = field(default_factory=dict)  # follow-up -> its new-ticket mail
    strangers: set[str] = field(default_factory=set)
    attachments: int = 0


class TimedSMTPServer(RecordingSMTPServer):
    """The rig's recording server, which also notes when the latest mail arrived."""

    last_at = 0.0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record the mail as the rig does, then note the time."""
        status = await super().handle_DATA(server, session, envelope)
        self.last_at = time.monotonic()
        return status


def make_mail(sender: tuple[str, str], subject: str, text: str, *, rng: random.Random,
              parent: str | None = None, attachment: bytes | None = None) -> EmailMessage:
    """One customer mail; a third carry an HTML alternative, as most mail clients send."""
    mail = EmailMessage(policy=email.policy.SMTP)
    mail["From"] = f"{sender[0]} <{sender[1]}>"
    mail["To"] = DESK
    mail["Subject"] = subject
    mail["Date"] = format_datetime(datetime.now(UTC))
    mail["Message-ID"] = f"<{rng.randbytes(10).hex()}@{sender[1].rpartition('@')[2]}>"
    if parent is not None:
        mail["In-Reply-To"] = mail["References"] = parent
    mail.set_content(text)
    if rng.random() < 0.33:
        paragraphs = "".join(f"<p>{html.escape(p)}</p>" for p in text.split("\n\n"))
        mail.add_alternative(f"<html><body>{paragraphs}</body></html>", subtype="html")
    if attachment is not None:
        mail.add_attachment(attachment, maintype="application", subtype="pdf",
                            filename=f"capture-{rng.randint(1, 999)}.pdf")
    return mail


def generate(n: int, accounts: list[tuple[str, str, str]], rng: random.Random) -> Plan:
    """N mails: ~70% new tickets, ~20% follow-ups by In-Reply-To, ~10% from strangers."""
    plan = Plan()
    opened: list[tuple[tuple[str, str], str, str, str, str]] = []
    # Few strangers, so that several write more than once and test the one-answer-a-day rule.
    strangers = [f"prospect{k}@unknown{k % 3}.example" for k in range(max(3, n // 40))]
    for _ in range(n):
        roll = rng.random()
        if roll < 0.10:
            address = rng.choice(strangers)
            mail = make_mail(("Prospect", address), rng.choice(SUBJECTS["en"]),
                             "\n\n".join(PARAGRAPHS["en"]), rng=rng)
            plan.strangers.add(address)
            kind = "unknown"
        elif roll < 0.30 and opened:
            # Ticket numbers follow processing order, so a follow-up names its ticket by the
            # Message-ID of the mail that opened it, which holds whatever the numbering.
            sender, locale, subject, text, parent = rng.choice(opened)
            quoted = "\n".join(f"> {line}" for line in text.splitlines())
            news, wrote = REPLIES[locale]
            reply = f"{news}\n\n{sender[0]}\n\n{sender[0]} {wrote}\n{quoted}\n"
            mail = make_mail(sender, f"Re: {subject}", reply, rng=rng, parent=parent)
            plan.parents[mail["Message-ID"]] = parent
            kind = "followup"
        else:
            address, name, locale = rng.choice(accounts)
            ref = "réf." if locale == "fr" else "ref."
            subject = f"{rng.choice(SUBJECTS[locale])} ({ref} {rng.randint(1000, 9999)})"
            text = "\n\n".join(PARAGRAPHS[locale]) + f"\n\n{name}"
            attachment = None
            if rng.random() < 0.10:
                plan.attachments += 1
                attachment = b"%PDF-1.4\n" + rng.randbytes(rng.randint(20_000, 200_000))
            mail = make_mail((name, address), subject, text, rng=rng, attachment=attachment)
            opened.append(((name, address), locale, subject, text, mail["Message-ID"]))
            kind = "ticket"
        plan.kinds[mail["Message-ID"]] = kind
        plan.raws.append(mail.as_bytes())
    return plan


def seed(engine: sa.Engine) -> list[tuple[str, str, str]]:
    """Two companies with ten accounts each and two EU agents; returns (email, name, locale)."""
    accounts = []
    with database.session_scope(engine) as session:
        for shift, (company, (domain, after_hours, locale)) in enumerate(COMPANIES.items()):
            directory.add_company(session, name=company, after_hours=after_hours, actor="bench")
            for i, first in enumerate(FIRST):
                # The second company's people get other surnames: shift the pairing.
                last = LAST[(i + 3 * shift) % len(LAST)]
                local = unicodedata.normalize("NFKD", f"{first}.{last}").encode("ascii", "ignore")
                address = f"{local.decode().lower()}@{domain}"
                directory.add_account(session, email=address, name=f"{first} {last}",
                                      company=company, locale=locale, actor="bench")
                accounts.append((address, f"{first} {last}", locale))
        for address, name in AGENTS.items():
            directory.add_agent(session, email=address, name=name, region="eu", actor="bench")
    return accounts


def write_config(base: Path, imap: ImapAccount, smtp: RecordingSMTPServer) -> Path:
    """A config: SQLite under the state dir, IMAP to the rig, no listener, SMTP to the rig."""
    path = base / "config.toml"
    path.write_text(
        f'[desk]\naddress = "{DESK}"\nstate_dir = "{base / "state"}"\n'
        f'[imap]\nenabled = true\nhost = "{imap.host}"\nport = {imap.port}\ntls = "none"\n'
        f'username = "{imap.username}"\npassword = "{imap.password}"\n'
        "[listener]\nenabled = false\n"
        f'[smtp]\ntransport = "smtp"\nhost = "{smtp.host}"\nport = {smtp.port}\ntls = "none"\n'
        '[privacy]\nnotice_url = "https://vendor.example/privacy"\n'
        '[security]\nreply_key = "bench-reply-key"\n',
        encoding="utf-8",
    )
    return path


def baseline(imap: ImapAccount) -> float:
    """Mails per second for FETCH BODY.PEEK[] in batches of 50 plus a light parse of each."""
    with imap.client() as client:
        started = time.perf_counter()
        client.select_folder("INBOX", readonly=True)
        uids = sorted(client.search("ALL"))
        for start in range(0, len(uids), 50):
            for item in client.fetch(uids[start : start + 50], ["BODY.PEEK[]"]).values():
                message = email.message_from_bytes(item[b"BODY[]"], policy=email.policy.default)
                body = message.get_body(preferencelist=("plain", "html"))
                if body is not None:
                    body.get_content()
                for part in message.iter_attachments():
                    part.get_content()
        return len(uids) / (time.perf_counter() - started)


def kill_if_running(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process unless it has already exited (a clean stop came first)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def log_events(path: Path) -> list[dict[str, Any]]:
    """The daemon's JSON log lines; anything else (a traceback) is skipped."""
    events = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            events.append(json.loads(line))
    return events


def wait_drained(proc: subprocess.Popen[bytes], imap: ImapAccount, engine: sa.Engine,
                 smtp: TimedSMTPServer, deadline: float, log: Path) -> tuple[float, float]:
    """Wait until the INBOX is empty and every Outbox row has reached the SMTP server.

    Returns the monotonic times when the INBOX was seen empty and when the last mail arrived.
    """
    empty_at: float | None = None
    with imap.client() as watcher:
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise BenchError(f"maildesk exited with {proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise BenchError(f"timed out: INBOX empty={empty_at is not None}, "
                                 f"{len(smtp.mails)} mails at the SMTP server")
            if empty_at is None and watcher.folder_status("INBOX", [b"MESSAGES"])[b"MESSAGES"] == 0:
                empty_at = time.monotonic()
            if empty_at is not None:
                # Each mail leaves the INBOX only after its transaction committed, so every
                # Outbox row that will ever exist for these mails exists by now.
                with engine.connect() as conn:
                    query = sa.text("SELECT status, count(*) FROM outbox GROUP BY status")
                    statuses = {status: count for status, count in conn.execute(query)}
                if statuses.get("failed"):
                    raise BenchError(f"{statuses['failed']} outgoing mails failed")
                if set(statuses) <= {"sent"} and len(smtp.mails) >= statuses.get("sent", 0):
                    return empty_at, max(empty_at, smtp.last_at)
            time.sleep(0.2)


@dataclass
class Measures:
    """What the run measured, in seconds from maildesk's start unless said otherwise."""

    fill: float  # APPENDing the mails, not timed against anything
    baseline: float  # mails per second
    startup: float  # until the "started" log line
    empty: float  # until the INBOX was seen empty
    done: float  # until the last outgoing mail reached the SMTP server


def check(plan: Plan, engine: sa.Engine, imap: ImapAccount, smtp: RecordingSMTPServer,
          events: list[dict[str, Any]]) -> tuple[list[tuple[bool, str]], Counter[str], list[float]]:
    """Compare what maildesk stored and sent with the plan.

    Returns the checks, the Outbox rows by kind, and how long each acknowledgement waited in
    the Outbox (seconds from its commit to its delivery), sorted.
    """
    planned = Counter(plan.kinds.values())
    with database.session_scope(engine) as session:
        rows = {row.message_id: row for row in session.exec(select(InboundMail))}
        inbound = session.exec(select(sa.func.count()).select_from(InboundMail)).one()
        tickets = session.exec(select(sa.func.count()).select_from(Ticket)).one()
        outbox = session.exec(select(Outbox.kind, Outbox.created_at, Outbox.sent_at)).all()
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


def spread(values: list[float]) -> str:
    """Median, 95th percentile and maximum of sorted values."""
    p95 = values[max(0, round(len(values) * 0.95) - 1)]
    return f"median {statistics.median(values):.1f}, p95 {p95:.1f}, max {values[-1]:.1f}"


def report(n: int, plan: Plan, measures: Measures, events: list[dict[str, Any]],
           checks: list[tuple[bool, str]], kinds: Counter[str], waits: list[float]) -> None:
    """Print the figures and the checks."""
    m = measures
    planned = Counter(plan.kinds.values())
    processed = [e for e in events if e.get("event") == "mail processed"]
    outcomes = Counter(e.get("outcome") for e in processed)
    millis = sorted(float(e.get("ms", 0)) for e in processed) or [0.0]
    troubles = Counter(f"{e.get('level')}: {e.get('event')}" for e in events
                       if e.get("level") in ("warning", "error", "critical"))
    rate, rate_up = n / m.done, n / (m.done - m.startup)
    print(f"maildesk ingest benchmark: N={n}, {sum(map(len, plan.raws)) / 1e6:.1f} MB "
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
    print(f"  pipeline ms per mail (log): {spread(millis)}")
    print(f"  acknowledgement s in Outbox: {spread(waits)}")
    print(f"  tickets {outcomes['ticket']}, follow-ups {outcomes['followup']}, quarantined "
          f"{outcomes['quarantined']}; outgoing mails {kinds.total()}")
    print(f"  log: mail processed {dict(outcomes)}; warnings/errors: {dict(troubles) or 'none'}")
    for ok, text in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {text}")


def run(args: argparse.Namespace, base: Path, cleanup: contextlib.ExitStack) -> int:
    """Set up the rig, fill the INBOX, measure the baseline and maildesk, report; the exit code."""
    deadline = time.monotonic() + args.timeout
    dovecot, smtp = DovecotServer(), TimedSMTPServer()
    dovecot.start()
    cleanup.callback(dovecot.stop)
    smtp.start()
    cleanup.callback(smtp.stop)
    imap = dovecot.add_user()
    config = write_config(base, imap, smtp)
    engine = database.make_engine(f"sqlite:///{base / 'state' / 'maildesk.sqlite3'}")
    cleanup.callback(engine.dispose)
    database.upgrade(engine)
    plan = generate(args.n, seed(engine), random.Random(args.seed))

    started = time.perf_counter()
    with imap.client() as client:
        for raw in plan.raws:
            client.append("INBOX", raw)
    fill = time.perf_counter() - started
    if time.monotonic() > deadline:
        raise BenchError("timed out while filling the INBOX")
    # Twice, keeping the better, so that the first pass warms Dovecot's caches for both sides.
    base_rate = max(baseline(imap), baseline(imap))

    log = base / "maildesk.log"
    command = [sys.executable, "-m", "maildesk"]
    if args.profile:
        command = [sys.executable, "-c", PROFILED_MAIN, str(Path(args.profile).resolve())]
    began_wall, began = time.time(), time.monotonic()
    with log.open("wb") as out:
        # If the benchmark itself is killed, the kernel takes maildesk down with it.
        proc = subprocess.Popen([*command, "--config", str(config), "run"], stdout=out,
                                stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent(signal.SIGKILL))
    cleanup.callback(kill_if_running, proc)
    empty, done = (at - began for at in wait_drained(proc, imap, engine, smtp, deadline, log))
    proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = proc.wait(timeout=120 if args.profile else 30)
    except subprocess.TimeoutExpired:
        code = None  # Reported as a failed check; the cleanup kills it.

    events = log_events(log)
    start_line = next((e for e in events if e.get("event") == "started"), None)
    if start_line is None:
        raise BenchError(f'no "started" line in {log}')
    startup = datetime.fromisoformat(start_line["timestamp"]).timestamp() - began_wall
    checks, kinds, waits = check(plan, engine, imap, smtp, events)
    checks.append((code == 0, f"maildesk exited with {code} after SIGTERM"))
    report(args.n, plan, Measures(fill, base_rate, startup, empty, done), events,
           checks, kinds, waits)
    return 0 if all(ok for ok, _ in checks) else 1


def main() -> int:
    """Parse the command line, run the benchmark and always clean up; the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="mails to ingest (default 2000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the mail mix")
    parser.add_argument("--timeout", type=float, default=1200, help="give up after seconds")
    parser.add_argument("--profile", metavar="PATH", help="profile the daemon into a pstats file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (log, database)")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C does, so that the servers and temp dirs go either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    base = Path(tempfile.mkdtemp(prefix="maildesk-bench-"))
    with contextlib.ExitStack() as cleanup:
        if args.keep:
            print(f"keeping {base}", file=sys.stderr)
        else:
            cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        try:
            return run(args, base, cleanup)
        except BenchError as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return 1  # Not reached; the type checker cannot tell.


if __name__ == "__main__":
    sys.exit(main())
