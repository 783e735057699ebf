"""The `retention` command: erase what the privacy notice says is kept no longer."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from maildesk.cli.errors import CommandError
from maildesk.cli.output import terminal_safe
from maildesk.config import Settings
from maildesk.store import database


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an ISO 8601 time, got "{text}"') from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def cmd_retention_run(args: argparse.Namespace, settings: Settings) -> int:
    """Erase every account, mail and audit event whose retention has ended."""
    from maildesk.privacy.erase import ErasureError
    from maildesk.privacy.retention import run_retention

    engine = database.make_engine(settings.store_url)
    try:
        database.check_schema(engine)
        report = run_retention(settings, engine, now=args.now, dry_run=args.dry_run,
                               actor=args.actor)
    except ErasureError as exc:
        raise CommandError(f"{exc}; run it again later") from None
    finally:
        engine.dispose()
    verb = "would erase" if args.dry_run else "erased"
    print(f"retention: {verb} {len(report.accounts)} accounts")
    for pseudonym, email in report.accounts:
        # A dry run shows the operator whom it would erase; afterwards only the pseudonym,
        # which the audit trail keeps, is left to show.
        print(f"  {terminal_safe(email) if args.dry_run else pseudonym}")
    for kind, count in report.counts.items():
        if kind != "accounts":
            print(f"  {kind}: {count}")
    print(f"retention: {verb} {report.stranger_mails} mails from strangers, "
          f"{report.stranger_outbox} mails sent to strangers, "
          f"{report.audit_events} audit events, {report.files} files")
    if settings.imap.enabled:
        print(f"retention: {'' if not args.dry_run else 'would have '}deleted "
              f"{report.imap_deleted} IMAP copies")
        for line in report.imap_not_found:
            print(f"  IMAP copy not found: {terminal_safe(line)}")
    return 0


def add_parsers(command: Any) -> None:
    """Add the retention command to the parser."""
    sub = command("retention run", "erase what is kept no longer: accounts deactivated more "
                  "than [privacy] retention_years ago, strangers' mails after quarantine_days, "
                  "audit events after audit_days", cmd_retention_run)
    sub.add_argument("--dry-run", action="store_true", help="say what would be erased")
    # For tests only: the moment the run takes as now.
    sub.add_argument("--now", type=_moment, default=None, help=argparse.SUPPRESS)
