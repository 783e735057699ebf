"""What the benchmarks share: the rig, a desk's config and seed, the mail mix, the daemon.

Each benchmark starts its own rig from tests/rig (a throwaway Dovecot, a recording SMTP server
that also notes when each mail arrived, and a PostgreSQL cluster when `--store postgres`), writes
a desk's config, seeds it, and runs `maildesk run` as a process. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import email
import email.policy
import html
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from aiosmtpd.smtp import SMTP, Envelope, Session

# The rig lives in tests/, which is no package: put it on the path, as the test suite does.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from rig.dovecot import DovecotServer, ImapAccount, die_with_parent, free_port
from rig.postgres import PostgresCluster
from rig.smtp import RecordingSMTPServer

from maildesk.store import database, directory

__all__ = ["DovecotServer", "ImapAccount", "free_port"]

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
# A backlog from twenty people would trip the per-sender breaker and the per-mailbox cap on
# automatic mail, and fifty strangers the hourly cap on answers to them; they are there for
# loops and floods, not for a benchmark: all three are lifted.
NO_LIMITS = ("automatic_per_mailbox_per_day = 1000000\nbreaker_tickets = 1000000\n"
             "stranger_answers_per_hour = 1000000\n")


class BenchError(Exception):
    """The benchmark could not complete; the message says why."""


class TimedSMTPServer(RecordingSMTPServer):
    """The rig's recording server, which also notes when each accepted mail arrived."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Start as the rig's server does, with an empty list of arrival times."""
        super().__init__(*args, **kwargs)
        self.last_at = 0.0
        # (monotonic time, Message-ID, In-Reply-To, recipients) of each accepted mail, in order.
        self.stamps: list[tuple[float, str, str, tuple[str, ...]]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record the mail as the rig does, then note the time."""
        status = await super().handle_DATA(server, session, envelope)
        now = time.monotonic()
        if status.startswith("250"):
            mail = self.mails[-1]
            self.stamps.append((now, str(mail.message["Message-ID"] or ""),
                                str(mail.message["In-Reply-To"] or ""), tuple(mail.rcpt_tos)))
            self.last_at = now
        return status

    def acknowledged(self) -> dict[str, float]:
        """A customer's Message-ID -> when the first acknowledgement of it arrived.

        An acknowledgement answers the customer's mail (In-Reply-To) and goes to no agent.
        """
        first: dict[str, float] = {}
        for at, _, parent, recipients in list(self.stamps):
            if parent and not set(recipients) & set(AGENTS):
                first.setdefault(parent, at)
        return first

    def acknowledgements(self) -> dict[str, list[str]]:
        """A customer's Message-ID -> the Message-IDs of every acknowledgement delivered."""
        found: dict[str, list[str]] = {}
        for _, message_id, parent, recipients in list(self.stamps):
            if parent and not set(recipients) & set(AGENTS):
                found.setdefault(parent, []).append(message_id)
        return found


@dataclass
class Rig:
    """The servers of one benchmark run, all stopped by `cleanup`."""

    base: Path
    cleanup: contextlib.ExitStack
    store: str = "sqlite"
    dovecot: DovecotServer | None = None
    smtp: TimedSMTPServer = field(default_factory=TimedSMTPServer)
    postgres: PostgresCluster | None = None
    _databases: int = 0

    def start(self, *, imap: bool = True) -> Rig:
        """Start the SMTP sink, Dovecot when `imap`, and PostgreSQL for that store."""
        self.smtp.start()
        self.cleanup.callback(self.smtp.stop)
        if imap:
            self.dovecot = DovecotServer()
            self.dovecot.start()
            self.cleanup.callback(self.dovecot.stop)
        if self.store == "postgres":
            self.postgres = PostgresCluster()
            self.postgres.start()
            self.cleanup.callback(self.postgres.stop)
        return self

    def account(self) -> ImapAccount:
        """A new IMAP user with an empty INBOX."""
        assert self.dovecot is not None
        return self.dovecot.add_user()

    def store_url(self, directory_: Path) -> str:
        """A new, empty database: a SQLite file in the desk's state dir, or a PostgreSQL one."""
        if self.postgres is None:
            (directory_ / "state").mkdir(parents=True, exist_ok=True)
            return f"sqlite:///{directory_ / 'state' / 'maildesk.sqlite3'}"
        self._databases += 1
        return self.postgres.url(self.postgres.create_database(f"bench_{self._databases}"))


def write_config(directory_: Path, store_url: str, smtp: RecordingSMTPServer, *,
                 imap: ImapAccount | None = None, listener_port: int | None = None,
                 limits: str = "") -> Path:
    """A desk's config for the rig: IMAP and the listener when given, SMTP to the sink."""
    imap_section = "[imap]\nenabled = false\n"
    if imap is not None:
        imap_section = (
            f'[imap]\nenabled = true\nhost = "{imap.host}"\nport = {imap.port}\ntls = "none"\n'
            f'username = "{imap.username}"\npassword = "{imap.password}"\npoll_seconds = 60\n'
        )
    listener = "[listener]\nenabled = false\n"
    if listener_port is not None:
        listener = f'[listener]\nenabled = true\nhost = "127.0.0.1"\nport = {listener_port}\n'
    path = directory_ / "config.toml"
    path.write_text(
        f'[desk]\naddress = "{DESK}"\nstate_dir = "{directory_ / "state"}"\n'
        f'[store]\nurl = "{store_url}"\n{imap_section}{listener}'
        f'[smtp]\ntransport = "smtp"\nhost = "{smtp.host}"\nport = {smtp.port}\ntls = "none"\n'
        f"[limits]\n{NO_LIMITS}{limits}"
        '[privacy]\nnotice_url = "https://vendor.example/privacy"\n'
        '[security]\nreply_key = "bench-reply-key"\n',
        encoding="utf-8",
    )
    return path


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


def make_desk(rig: Rig, directory_: Path, *, imap: ImapAccount | None = None,
              listener_port: int | None = None, limits: str = "",
              before_seed: Callable[[sa.Engine], None] | None = None,
              ) -> tuple[Path, sa.Engine, list[tuple[str, str, str]]]:
    """A desk's directory, config and upgraded, seeded database: (config, engine, accounts)."""
    directory_.mkdir(parents=True, exist_ok=True)
    url = rig.store_url(directory_)
    config = write_config(directory_, url, rig.smtp, imap=imap, listener_port=listener_port,
                          limits=limits)
    engine = database.make_engine(url)
    rig.cleanup.callback(engine.dispose)
    database.upgrade(engine)
    if before_seed is not None:
        before_seed(engine)
    return config, engine, seed(engine)


@dataclass
class Plan:
    """The generated mails, in INBOX order, and what should become of each."""

    raws: list[bytes] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)  # Message-ID -> ticket/followup/unknown
    parents: dict[str, str] = field(default_factory=dict)  # follow-up -> its new-ticket mail
    strangers: set[str] = field(default_factory=set)
    attachments: int = 0


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


def new_ticket_mail(accounts: Sequence[tuple[str, str, str]], rng: random.Random,
                    attachment: bytes | None = None) -> tuple[EmailMessage, tuple[Any, ...]]:
    """A mail from a known person that opens a ticket, and what a follow-up needs of it."""
    address, name, locale = rng.choice(accounts)
    ref = "réf." if locale == "fr" else "ref."
    subject = f"{rng.choice(SUBJECTS[locale])} ({ref} {rng.randint(1000, 9999)})"
    text = "\n\n".join(PARAGRAPHS[locale]) + f"\n\n{name}"
    mail = make_mail((name, address), subject, text, rng=rng, attachment=attachment)
    return mail, ((name, address), locale, subject, text, mail["Message-ID"])


def generate(n: int, accounts: list[tuple[str, str, str]], rng: random.Random) -> Plan:
    """N mails: ~70% new tickets, ~20% follow-ups by In-Reply-To, ~10% from strangers."""
    plan = Plan()
    opened: list[tuple[Any, ...]] = []
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
            attachment = None
            if rng.random() < 0.10:
                plan.attachments += 1
                attachment = b"%PDF-1.4\n" + rng.randbytes(rng.randint(20_000, 200_000))
            mail, opening = new_ticket_mail(accounts, rng, attachment)
            opened.append(opening)
            kind = "ticket"
        plan.kinds[mail["Message-ID"]] = kind
        plan.raws.append(mail.as_bytes())
    return plan


def fill(imap: ImapAccount, raws: Sequence[bytes]) -> float:
    """APPEND the mails to the INBOX over one connection; the seconds it took."""
    started = time.perf_counter()
    with imap.client() as client:
        for raw in raws:
            client.append("INBOX", raw)
    return time.perf_counter() - started


def walk(raw: bytes) -> None:
    """The baseline's parse: the email package's modern parser, the body, every attachment."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    body = message.get_body(preferencelist=("plain", "html"))  # type: ignore[attr-defined]
    if body is not None:
        body.get_content()
    for part in message.iter_attachments():  # type: ignore[attr-defined]
        part.get_content()


def fetch_parse_baseline(imap: ImapAccount) -> float:
    """Mails per second for FETCH BODY.PEEK[] in batches of 50 plus a walk of each mail."""
    with imap.client() as client:
        started = time.perf_counter()
        client.select_folder("INBOX", readonly=True)
        uids = sorted(client.search("ALL"))
        for start in range(0, len(uids), 50):
            for item in client.fetch(uids[start : start + 50], ["BODY.PEEK[]"]).values():
                walk(item[b"BODY[]"])
        return len(uids) / (time.perf_counter() - started)


def log_events(path: Path) -> list[dict[str, Any]]:
    """The daemon's JSON log lines; anything else (a traceback) is skipped."""
    events = []
    if not path.exists():
        return events
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            events.append(json.loads(line))
    return events


class Daemon:
    """`maildesk run` as a process, with its log; `command` replaces `python -m maildesk`."""

    def __init__(self, config: Path, log: Path, command: Sequence[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        """Remember how to start; call start()."""
        self.config = config
        self.log = log
        self.command = list(command or [sys.executable, "-m", "maildesk"])
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.began = 0.0  # monotonic time of the latest start
        self.began_wall = 0.0

    @property
    def pid(self) -> int:
        """The running process's id."""
        assert self.proc is not None
        return self.proc.pid

    def _started_lines(self) -> int:
        return sum(e.get("event") == "started" for e in log_events(self.log))

    def start(self, *, wait: bool = True, env: dict[str, str] | None = None,
              timeout: float = 60) -> None:
        """Start the daemon and, with `wait`, wait for its "started" log line."""
        before = self._started_lines() if wait else 0
        environment = {**os.environ, **(self.env or {}), **(env or {})}
        self.began_wall, self.began = time.time(), time.monotonic()
        with self.log.open("ab") as out:
            # If the benchmark itself is killed, the kernel takes maildesk down with it.
            self.proc = subprocess.Popen(
                [*self.command, "--config", str(self.config), "run"], stdout=out,
                stderr=subprocess.STDOUT, env=environment,
                preexec_fn=die_with_parent(signal.SIGKILL),
            )
        if not wait:
            return
        deadline = time.monotonic() + timeout
        while self._started_lines() <= before:
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"maildesk did not start:\n{self.tail()}")
            time.sleep(0.02)

    def tail(self) -> str:
        """The end of the log, for an error message."""
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def check_alive(self) -> None:
        """Raise BenchError when the daemon exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"maildesk exited with {self.proc.returncode}:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL the daemon (and its parse child, which dies with it) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM and wait: the exit code, or None if it did not stop in time (then killed)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def children(self) -> list[int]:
        """The daemon's child processes (the parse worker)."""
        found: list[int] = []
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    found += [int(p) for p in (task / "children").read_text().split()]
        return found

    def started_after(self) -> float:
        """Seconds from the latest start to its "started" log line."""
        lines = [e for e in log_events(self.log) if e.get("event") == "started"]
        if not lines:
            raise BenchError(f'no "started" line in {self.log}')
        return datetime.fromisoformat(lines[-1]["timestamp"]).timestamp() - self.began_wall


def outbox_statuses(engine: sa.Engine, after_id: int = 0) -> dict[str, int]:
    """The outbox's rows (with ids above `after_id`) by status."""
    with engine.connect() as conn:
        query = sa.text("SELECT status, count(*) FROM outbox WHERE id > :after GROUP BY status")
        return {status: count for status, count in conn.execute(query, {"after": after_id})}


def wait_drained(daemon: Daemon, imap: ImapAccount, engine: sa.Engine, smtp: TimedSMTPServer,
                 deadline: float, after_id: int = 0) -> tuple[float, float]:
    """Wait until the INBOX is empty and every outbox row (above `after_id`) reached the sink.

    Returns the monotonic times when the INBOX was seen empty and when the last mail arrived.
    """
    empty_at: float | None = None
    with imap.client() as watcher:
        while True:
            daemon.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"timed out: INBOX empty={empty_at is not None}, "
                                 f"{len(smtp.mails)} mails at the SMTP server")
            if empty_at is None and watcher.folder_status("INBOX", [b"MESSAGES"])[b"MESSAGES"] == 0:
                empty_at = time.monotonic()
            if empty_at is not None:
                # A mail leaves the INBOX only once it is filed, so every outbox row that
                # will ever exist for these mails exists by now.
                statuses = outbox_statuses(engine, after_id)
                if statuses.get("failed"):
                    raise BenchError(f"{statuses['failed']} outgoing mails failed")
                if set(statuses) <= {"sent"} and len(smtp.mails) >= statuses.get("sent", 0):
                    return empty_at, max(empty_at, smtp.last_at)
            time.sleep(0.1)


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile of `values` (share in 0..1)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(len(ordered) * share + 0.5) - 1))]


def spread(values: Sequence[float], unit: str = "") -> str:
    """p50, p95, p99 and maximum of `values`."""
    if not values:
        return "no values"
    return (f"p50 {statistics.median(values):.1f}{unit}, p95 {percentile(values, 0.95):.1f}"
            f"{unit}, p99 {percentile(values, 0.99):.1f}{unit}, max {max(values):.1f}{unit}")


def attach_py_spy(pid: int, output: str, cleanup: contextlib.ExitStack) -> subprocess.Popen[bytes]:
    """Record the daemon and its children with py-spy until it exits (an optional tool)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise BenchError("py-spy is not installed: .venv/bin/pip install py-spy")
    proc = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--subprocesses", "--idle",
                             "--rate", "100", "-o", output, *(
                                 ["--format", "speedscope"] if output.endswith(".json")
                                 else ["--format", "raw"] if output.endswith(".txt") else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cleanup.callback(lambda: proc.poll() is None and proc.wait(timeout=60))
    return proc


def common_arguments(parser: argparse.ArgumentParser, n: int) -> None:
    """The options every benchmark takes."""
    parser.add_argument("-n", type=int, default=n, help=f"mails (default {n})")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite",
                        help="the desk's database (default sqlite)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the mail mix")
    parser.add_argument("--timeout", type=float, default=1800, help="give up after seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database)")


def bench_main(description: str, n: int, run: Callable[[argparse.Namespace, Rig], int],
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse the command line, run the benchmark and always clean up; the exit code."""
    parser = argparse.ArgumentParser(description=description)
    common_arguments(parser, n)
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C does, so that the servers and temp dirs go either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    base = Path(tempfile.mkdtemp(prefix="maildesk-bench-", dir="/tmp"))
    base.chmod(0o755)
    with contextlib.ExitStack() as cleanup:
        if args.keep:
            print(f"keeping {base}", file=sys.stderr)
        else:
            cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        try:
            return run(args, Rig(base, cleanup, args.store))
        except BenchError as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return 1  # Not reached; the type checker cannot tell.


@contextlib.contextmanager
def sampler(read: Callable[[], None], every: float = 0.02) -> Iterator[None]:
    """Call `read` every `every` seconds in a thread for the duration of the block."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            read()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
