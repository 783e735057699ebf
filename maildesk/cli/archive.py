"""`maildesk import mbox|maildir PATH`: file a past support mailbox without sending a mail."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from maildesk.cli.errors import CommandError
from maildesk.cli.output import terminal_safe
from maildesk.config import Settings
from maildesk.ingress.archive import ArchiveError, ImportReport, read_archive, store_archive
from maildesk.pipeline import Pipeline
from maildesk.runner import IntakeRunner, instance_name
from maildesk.store import database
from maildesk.store.intake import IntakeStore
from maildesk.store.models import RECEIVED, InboundMail


def _progress_bar(enabled: bool) -> Any:
    def show(report: ImportReport) -> None:
        if enabled:
            print(f"\rstored {report.stored}, already there {report.duplicates}, "
                  f"skipped {report.skipped} of {report.seen} read", end="", file=sys.stderr,
                  flush=True)  # fmt: skip

    return show


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    """Store and file every mail of the archive; print what became of them."""
    engine = database.make_engine(settings.store_url)
    database.check_schema(engine)
    terminal = sys.stderr.isatty()
    pipeline = Pipeline(settings, engine)
    # Its own name in queue claims: a restarted import takes back what a killed one held,
    # without touching the claims of a daemon that runs on the same host.
    pipeline.runner = IntakeRunner(pipeline, owner=f"{instance_name(settings)}:import")
    pipeline.runner.worker.take_back()
    try:
        intake = IntakeStore(engine, settings.desk.state_dir)
        try:
            report = store_archive(
                intake, read_archive(args.kind, Path(args.path)), since=args.since,
                progress=_progress_bar(terminal),
            )  # fmt: skip
        except (ArchiveError, OSError) as exc:
            raise CommandError(str(exc)) from None
        # Filed here, its own rows only: a running daemon may take some of them too, which is
        # just as quiet, since the source says they are past mail.
        pending = sorted(set(report.ids))
        for start in range(0, len(pending), 20):
            chunk = pending[start : start + 20]
            # Suspects (claimed before by a killed import) are filed one at a time.
            for _ in range(len(chunk) * 4):
                if not pipeline.runner.file_batch(only=chunk):
                    break
            if terminal:
                print(f"\rfiled {min(start + 20, len(pending))} of {len(pending)}",
                      end="", file=sys.stderr, flush=True)  # fmt: skip
        if terminal:
            print(file=sys.stderr)
        with Session(engine) as session:
            for start in range(0, len(pending), 500):
                rows = session.exec(
                    select(InboundMail.outcome, InboundMail.reason)
                    .where(col(InboundMail.id).in_(pending[start : start + 500]))
                )  # fmt: skip
                for outcome, reason in rows:
                    report.outcomes[outcome] += 1
                    if outcome == "quarantined":
                        report.reasons[reason or "?"] += 1
    finally:
        pipeline.close()
        engine.dispose()
    print(f"{report.seen} mails read: {report.stored} stored, {report.duplicates} already there, "
          f"{report.skipped} older than --since")  # fmt: skip
    for outcome, count in sorted(report.outcomes.items()):
        print(f"  {outcome}: {count}")
    for reason, count in report.reasons.most_common():
        print(f"    quarantined, {terminal_safe(reason)}: {count}")
    return 1 if report.outcomes.get(RECEIVED) else 0


def add_parsers(command: Any) -> None:
    """Add `import mbox` and `import maildir`."""
    from maildesk.cli.main import _parse_when

    for kind in ("mbox", "maildir"):
        sub = command(
            f"import {kind}",
            f"file a past support mailbox ({kind}) into tickets, sending no mail; resumable",
            cmd_import,
        )  # fmt: skip
        sub.add_argument("path", metavar="PATH")
        sub.add_argument("--since", type=_parse_when, metavar="DATE",
                         help="only mails dated from then on")  # fmt: skip
        sub.set_defaults(kind=kind)
