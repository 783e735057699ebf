"""The `privacy` commands: the rights of the people whose data the desk keeps.

Each command writes an audit event. `export` and `erase` come first; the other rights follow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from maildesk.cli.errors import CommandError
from maildesk.cli.output import terminal_safe
from maildesk.config import Settings
from maildesk.store import database


def _erasure_lines(report: Any) -> list[str]:
    """What an erasure takes (or took), one "kind: count" per line."""
    names = {"accounts": "account", "tickets": "tickets", "messages": "messages",
             "attachments": "attachments", "inbound_mails": "raw inbound mails",
             "outbox": "outgoing mails", "audit_pseudonymised": "audit events pseudonymised"}
    return [f"  {names.get(kind, kind)}: {count}" for kind, count in report.counts.items()]


# export (right of access)


def cmd_privacy_export(args: argparse.Namespace, settings: Settings) -> int:
    """Write everything kept about one account into a zip."""
    from maildesk.privacy.export import ExportError, write_export

    engine = database.make_engine(settings.store_url)
    try:
        database.check_schema(engine)
        document = write_export(settings, engine, args.email, Path(args.output),
                                actor=args.actor)
    except ExportError as exc:
        raise CommandError(str(exc)) from None
    finally:
        engine.dispose()
    print(f"{terminal_safe(args.output)}: data of {terminal_safe(document['account']['email'])}"
          f", {len(document['tickets'])} tickets, {len(document['files'])} files")
    return 0


# erase (right to erasure)


def _confirmed(email: str, lines: list[str]) -> bool:
    """Ask on the terminal; the operator types the address to confirm."""
    print(f"This erases the account {terminal_safe(email)} and everything of theirs:")
    print("\n".join(lines))
    try:
        answer = input("Type the address again to erase, anything else to stop: ")
    except EOFError:
        return False
    return answer.strip().lower() == email.strip().lower()


def cmd_privacy_erase(args: argparse.Namespace, settings: Settings) -> int:
    """Erase one account with all its tickets, mails and files."""
    from maildesk.privacy.erase import ErasureError, erase_account

    if not args.yes and not sys.stdin.isatty():
        raise CommandError("erasure needs confirmation: give --yes when not on a terminal")
    engine = database.make_engine(settings.store_url)
    try:
        database.check_schema(engine)
        if not args.yes:
            planned = erase_account(settings, engine, args.email, actor=args.actor,
                                    dry_run=True)
            if not _confirmed(args.email, _erasure_lines(planned)):
                print("nothing erased")
                return 1
        report = erase_account(settings, engine, args.email, actor=args.actor)
    except ErasureError as exc:
        raise CommandError(str(exc)) from None
    finally:
        engine.dispose()
    print(f"erased {terminal_safe(args.email.strip().lower())}, now {report.pseudonym} in the "
          "audit trail:")
    print("\n".join(_erasure_lines(report)))
    print(f"  files deleted: {report.files_deleted}")
    if settings.imap.enabled:
        print(f"  IMAP copies deleted: {report.imap_deleted}")
        for line in report.imap_not_found:
            print(f"  IMAP copy not found: {terminal_safe(line)}")
    if not report.wal_truncated:
        print("  note: a reader kept the SQLite WAL busy; erased bytes leave the -wal file at "
              "the next checkpoint")
    return 0


def add_parsers(command: Any) -> None:
    """Add the privacy commands to the parser."""
    sub = command("privacy export", "write everything kept about one account into a zip "
                  "(right of access); the format is in README.md", cmd_privacy_export)
    sub.add_argument("email", metavar="EMAIL")
    sub.add_argument("-o", "--output", required=True, metavar="FILE.zip")
    sub = command("privacy erase", "erase one account with all its tickets, mails and files "
                  "(right to erasure)", cmd_privacy_erase)
    sub.add_argument("email", metavar="EMAIL")
    sub.add_argument("--yes", action="store_true", help="do not ask for confirmation")
