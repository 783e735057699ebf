"""Scale benchmark: the backlog on a store that already holds many tickets, against an empty one.

Run `.venv/bin/python bench/scale.py [-n 1000] [--tickets 1000000] [--store sqlite|postgres]`.
The history is generated straight into the upgraded database with bulk INSERTs (sqlite3
executemany, PostgreSQL COPY), in proportions taken from a desk's life: a company per 1,000
tickets, an account per 20, per ticket two or three messages (the customer's mail, an agent's
answer, for one ticket in three a follow-up), an inbound row for each customer mail and a sent
acknowledgement in the outbox (its raw bytes a short stub, to keep the file small). Then the
same backlog as bench/ingest.py runs on that desk and on an empty one; the figure is the ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from benchlib import Rig, bench_main
from ingest import drain_backlog

CHUNK = 20_000
STUB = b"Subject: acknowledgement\r\n\r\n(body left out by bench/scale.py)\r\n"
TEXTS = ["Bonjour, l'export PDF échoue depuis ce matin. Pouvez-vous regarder ? Merci.",
         "Hello, the dashboard is very slow since the update. Thanks for checking.",
         "Toujours le même problème aujourd'hui, avez-vous du nouveau ?"]
ANSWER = "Bonjour, le correctif est en ligne : pouvez-vous réessayer ? Cordialement, Alice"


def history(tickets: int, seed: int) -> dict[str, Iterator[tuple[Any, ...]]]:
    """Rows per table (columns as in COLUMNS), generated lazily."""
    rng = random.Random(seed)
    companies = max(1, tickets // 1000)
    accounts = max(1, tickets // 20)
    start = datetime.now(UTC) - timedelta(days=5 * 365)
    span = 5 * 365 * 86400

    def when(index: int) -> datetime:
        # Tickets come in order over five years; a little jitter keeps timestamps distinct.
        return start + timedelta(seconds=index * span / tickets + rng.random())

    def company_rows() -> Iterator[tuple[Any, ...]]:
        for c in range(1, companies + 1):
            yield (c, f"Company {c:07d}", c % 5 == 0, True, start)

    def account_rows() -> Iterator[tuple[Any, ...]]:
        for a in range(1, accounts + 1):
            yield (a, f"person{a}@company{a % companies + 1}.example", f"Person {a}",
                   a % companies + 1, "fr" if a % 3 else "en", start)

    def ticket_rows() -> Iterator[tuple[Any, ...]]:
        for t in range(1, tickets + 1):
            account = (t * 7919) % accounts + 1
            at = when(t)
            status = "closed" if t < tickets * 0.97 else rng.choice(["open", "pending", "solved"])
            yield (t, f"Demande {t} : {TEXTS[t % 3][:40]}", status, account,
                   account % companies + 1, at, at + timedelta(days=2))

    def message_rows() -> Iterator[tuple[Any, ...]]:
        m = 0
        for t in range(1, tickets + 1):
            account = (t * 7919) % accounts + 1
            at = when(t)
            email = f"person{account}@company{account % companies + 1}.example"
            parts = [("in", "account", email, TEXTS[t % 2]),
                     ("out", "agent", "alice.martin@vendor.example", ANSWER)]
            if t % 3 == 0:
                parts.append(("in", "account", email, TEXTS[2]))
            for step, (direction, kind, author, text) in enumerate(parts):
                m += 1
                inbound = m if direction == "in" else None
                yield (m, t, direction, kind, author, "", f"<{m:x}.{t:x}@history.example>",
                       text, at + timedelta(hours=step), inbound)

    def inbound_rows() -> Iterator[tuple[Any, ...]]:
        m = 0
        for t in range(1, tickets + 1):
            at = when(t)
            for step in range(3 if t % 3 == 0 else 2):
                m += 1
                if step == 1:
                    continue  # The agent's answer came through no intake.
                outcome = "ticket" if step == 0 else "followup"
                yield (m, "imap", f"raw/{m:064x}", f"{m:064x}", 2400, "INBOX", 1, m,
                       f"<{m:x}.{t:x}@history.example>", outcome, t, at, at, 1)

    def outbox_rows() -> Iterator[tuple[Any, ...]]:
        for t in range(1, tickets + 1):
            at = when(t)
            account = (t * 7919) % accounts + 1
            to = f"person{account}@company{account % companies + 1}.example"
            yield (t, "acknowledgement", f"<ack.{t:x}@desk.example>", "support@desk.example",
                   json.dumps([to]), STUB, t, "sent", 1, at, at, at, True, to, f"{t:016x}")

    return {"company": company_rows(), "account": account_rows(), "ticket": ticket_rows(),
            "message": message_rows(), "inboundmail": inbound_rows(),
            "outbox": outbox_rows()}


COLUMNS = {
    "company": ["id", "name", "after_hours", "active", "created_at"],
    "account": ["id", "email", "name", "company_id", "locale", "created_at"],
    "ticket": ["id", "subject", "status", "account_id", "company_id", "created_at",
               "updated_at"],
    "message": ["id", "ticket_id", "direction", "author_kind", "author_email", "author_name",
                "message_id", "text", "created_at", "inbound_mail_id"],
    "inboundmail": ["id", "source", "raw_path", "sha256", "size", "mailbox", "uidvalidity",
                    "uid", "message_id", "outcome", "ticket_id", "received_at",
                    "processed_at", "attempts"],
    "outbox": ["id", "kind", "message_id", "mail_from", "recipients", "raw", "ticket_id",
               "status", "attempts", "next_attempt_at", "created_at", "sent_at", "automatic",
               "mailbox_key", "verp"],
}
# Inbound rows are inserted before the messages that name them.
ORDER = ["company", "account", "ticket", "inboundmail", "message", "outbox"]


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, datetime):
        # As SQLAlchemy stores a UTC timestamp in SQLite.
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


def generate(engine: sa.Engine, tickets: int, seed: int) -> dict[str, int]:
    """Fill an upgraded, empty database with the history; rows per table."""
    rows = history(tickets, seed)
    counts: dict[str, int] = {}
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for table in ORDER:
            columns = COLUMNS[table]
            count = 0
            if engine.dialect.name == "sqlite":
                marks = ", ".join("?" * len(columns))
                query = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"  # noqa: S608
                chunk: list[tuple[Any, ...]] = []
                for row in rows[table]:
                    chunk.append(tuple(_sqlite_value(v) for v in row))
                    if len(chunk) >= CHUNK:
                        cursor.executemany(query, chunk)
                        count += len(chunk)
                        chunk.clear()
                cursor.executemany(query, chunk)
                count += len(chunk)
            else:
                copy_sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
                with cursor.copy(copy_sql) as copy:  # type: ignore[attr-defined]
                    for row in rows[table]:
                        copy.write_row(row)
                        count += 1
                # Explicit ids leave the sequence behind: the desk's own rows come next.
                top = f"SELECT max(id) FROM {table}"  # noqa: S608
                setval = f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), ({top}))"
                cursor.execute(setval)
            counts[table] = count
        raw.commit()
        if engine.dialect.name == "postgresql":
            raw.autocommit = True  # type: ignore[attr-defined]
            cursor.execute("ANALYZE")
        else:
            cursor.execute("ANALYZE")
            raw.commit()
    finally:
        raw.close()
    return counts


def run(args: argparse.Namespace, rig: Rig) -> int:
    """The backlog on the empty store, then on the full one; the exit code."""
    rig.start()
    empty = drain_backlog(rig, "empty", args, baseline=False)
    made: dict[str, Any] = {}

    def fill(engine: sa.Engine) -> None:
        started = time.perf_counter()
        made["counts"] = generate(engine, args.tickets, args.seed)
        made["seconds"] = time.perf_counter() - started

    full = drain_backlog(rig, "full", args, prepare=fill, baseline=False)
    counts = made["counts"]
    print(f"maildesk scale benchmark ({args.store}): backlog of N={args.n} mails")
    print(f"  store generated in {made['seconds']:.0f} s: "
          + ", ".join(f"{table} {count:,}" for table, count in counts.items()))
    print(f"  baseline: the empty store              {empty.rate:7.1f} mails/s "
          f"({empty.measures.done:.1f} s)")
    print(f"  maildesk on {args.tickets:,} tickets        {full.rate:7.1f} mails/s "
          f"({full.measures.done:.1f} s)  ratio {full.rate / empty.rate:.3f}  [target >= 0.8]")
    for name, backlog in (("empty", empty), ("full", full)):
        failed = [text for ok, text in backlog.checks if not ok]
        print(f"  {'ok  ' if not failed else 'FAIL'} {name} store: every check of "
              f"bench/ingest.py {'passed' if not failed else 'failed: ' + '; '.join(failed)}")
    return 0 if empty.ok and full.ok else 1


def options(parser: argparse.ArgumentParser) -> None:
    """The size of the store."""
    parser.add_argument("--tickets", type=int, default=1_000_000,
                        help="tickets already in the store (default 1,000,000)")


if __name__ == "__main__":
    sys.exit(bench_main(__doc__.splitlines()[0], 1000, run, options))
