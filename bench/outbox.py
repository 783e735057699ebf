"""Outbox benchmark: N queued notifications drained by the daemon's sender, against smtplib.

Run `.venv/bin/python bench/outbox.py [-n 2000] [--store sqlite|postgres]`. It upgrades an empty
desk database, inserts N outbox rows straight into it (drafts shaped like the notifier's: a text
and HTML alternative, a signed Reply-To, a VERP return path), and times maildesk's OutboxSender
(in this process, batch after batch as the daemon's send stage runs it, composing the drafts in
its child) until every row is sent and the recording SMTP sink holds them all. The baseline is
smtplib sending the same mails, already composed, over one reused connection to the same sink,
before and after; the better of the two is kept.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import smtplib
import sys
import time
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid

import sqlalchemy as sa
from benchlib import DESK, BenchError, Rig, bench_main, make_desk, outbox_statuses

from maildesk.config import load_settings
from maildesk.logs import configure_logging
from maildesk.outbound.compose import Draft, build
from maildesk.outbound.send import OutboxSender
from maildesk.rules.limits import mailbox_key
from maildesk.store.models import Outbox

TEXT = ("Bonjour {name},\n\nNous avons bien reçu votre demande « {subject} » et l'avons "
        "enregistrée sous le numéro #{ticket}. Un membre de l'équipe vous répond au plus vite.\n\n"
        "Pour compléter votre demande, répondez simplement à ce message.\n\n"
        "L'équipe Support\n\n-- \nConfidentialité : https://vendor.example/privacy\n")


def notification(rng: random.Random, index: int) -> dict[str, object]:
    """One outbox row as the notifier writes an acknowledgement: a draft, and its MIME form
    (kept aside as "mime", for the baseline; the row's `raw` is empty, as the notifier's)."""
    to = f"client{index % 500}@client{index % 7}.example"
    subject = f"Export PDF en erreur (réf. {rng.randint(1000, 9999)})"
    text = TEXT.format(name=f"Client {index}", subject=subject, ticket=index + 1)
    message_id = make_msgid(idstring="maildesk", domain="desk.example")
    paragraphs = "".join(f"<p>{p}</p>" for p in text.split("\n\n"))
    draft = Draft(
        message_id=message_id, date=format_datetime(datetime.now(UTC)),
        sender=("Support", DESK), to=("", to), subject=f"[#{index + 1}] {subject}",
        text=text, html=f"<html><body>{paragraphs}</body></html>", language="fr",
        loop="desk.example", in_reply_to=f"<{rng.randbytes(10).hex()}@client.example>",
        references=(f"<{rng.randbytes(10).hex()}@client.example>",),
        reply_to=("Support", f"support+t{index + 1}.{secrets.token_hex(12)}@desk.example"),
        auto="auto-replied",
    )
    verp = secrets.token_hex(8)
    now = datetime.now(UTC)
    return {
        "kind": "acknowledgement", "message_id": message_id,
        "mail_from": f"support+bounce-{verp}@desk.example", "recipients": json.dumps([to]),
        "raw": b"", "draft": draft.to_json(), "mime": build(draft, lambda f: None),
        "ticket_id": None, "status": "pending", "attempts": 0, "deferrals": 0,
        "next_attempt_at": now, "created_at": now, "automatic": True,
        "mailbox_key": mailbox_key(to), "verp": verp,
    }


def smtplib_rate(port: int, rows: list[dict[str, object]]) -> float:
    """Mails per second for smtplib sending the rows over one reused connection."""
    started = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        for row in rows:
            recipients = json.loads(str(row["recipients"]))
            client.sendmail(str(row["mail_from"]), recipients, row["mime"])  # type: ignore[arg-type]
    return len(rows) / (time.perf_counter() - started)


def run(args: argparse.Namespace, rig: Rig) -> int:
    """The baseline, the sender, the baseline again; the exit code."""
    rig.start(imap=False)
    rng = random.Random(args.seed)
    config, engine, _ = make_desk(rig, rig.base / "desk")
    rows = [notification(rng, index) for index in range(args.n)]
    before = smtplib_rate(rig.smtp.port, rows)
    with engine.begin() as conn:
        conn.execute(sa.insert(Outbox.__table__),  # type: ignore[attr-defined]
                     [{k: v for k, v in row.items() if k != "mime"} for row in rows])
    # The daemon logs a JSON line per mail sent into its log file: so does the sender here.
    log = (rig.base / "desk" / "maildesk.log").open("w", encoding="utf-8")
    rig.cleanup.callback(log.close)
    configure_logging("info", json=True, stream=log)
    # As the daemon runs it: drafts composed ahead in a child process, outcomes recorded behind.
    sender = OutboxSender(load_settings(config), engine, owner="bench-sender", compose_ahead=True)
    rig.cleanup.callback(sender.close)
    rig.smtp.clear()
    deadline = time.monotonic() + args.timeout
    started = time.perf_counter()
    while len(rig.smtp.mails) < args.n:
        report = sender.send_batch(limit=100)
        if report.retried or report.failed:
            raise BenchError(f"the sender retried {report.retried}, failed {report.failed}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out with {len(rig.smtp.mails)} mails at the sink")
    rate = args.n / (time.perf_counter() - started)
    statuses = outbox_statuses(engine)
    rig.smtp.clear()
    after = smtplib_rate(rig.smtp.port, rows)
    baseline = max(before, after)
    size = sum(len(row["mime"]) for row in rows) / len(rows)  # type: ignore[arg-type]
    print(f"maildesk outbox benchmark ({args.store}): N={args.n} queued notifications "
          f"of {size / 1024:.1f} KB")
    print(f"  baseline (smtplib, one reused connection, best of {before:.0f}/{after:.0f})"
          f" {baseline:7.1f} mails/s")
    print(f"  maildesk OutboxSender                                {rate:7.1f} mails/s"
          f"  ratio {rate / baseline:.3f}  [target >= 0.7]")
    ok = statuses == {"sent": args.n}
    print(f"  {'ok  ' if ok else 'FAIL'} outbox rows by status: {statuses}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(bench_main(__doc__.splitlines()[0], 2000, run))
