"""The `privacy` commands: the rights of the people whose data the desk keeps.

Each command writes an audit event. `export` and `erase` come first; the other rights follow.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlmodel import Session

from maildesk.cli.errors import CommandError
from maildesk.cli.output import print_json, table, terminal_safe
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


# restriction, objection, post-mortem directives, rights requests, the record of processing


def _rights_transaction(settings: Settings, work: Callable[[Session], int]) -> int:
    engine = database.make_engine(settings.store_url)
    try:
        database.check_schema(engine)
        with database.session_scope(engine) as session:
            return work(session)
    finally:
        engine.dispose()


def cmd_privacy_restrict(args: argparse.Namespace, settings: Settings) -> int:
    """Restrict the processing of one account's data."""
    from maildesk.privacy import rights

    def work(session: Session) -> int:
        account = rights.restrict(session, email=args.email, actor=args.actor)
        print(f"account {terminal_safe(account.email)} restricted: its new mails are kept "
              "without notifying agents, and nothing of it reaches US staff")
        return 0

    return _rights_transaction(settings, work)


def cmd_privacy_unrestrict(args: argparse.Namespace, settings: Settings) -> int:
    """Lift the restriction of one account's data."""
    from maildesk.privacy import rights

    def work(session: Session) -> int:
        account = rights.unrestrict(session, email=args.email, actor=args.actor)
        print(f"account {terminal_safe(account.email)} no longer restricted")
        return 0

    return _rights_transaction(settings, work)


def cmd_privacy_object(args: argparse.Namespace, settings: Settings) -> int:
    """Record an objection and open a ticket for the DPO."""
    from maildesk.privacy import notice, rights

    def work(session: Session) -> int:
        objection = rights.record_objection(
            session, notice.unsigned_notifier(settings), email=args.email, actor=args.actor
        )
        print(f"objection of {terminal_safe(objection.account.email)} recorded; ticket "
              f"#{objection.ticket.id} opened for the DPO "
              f"({terminal_safe(settings.privacy.dpo_email)}), answer due "
              f"{objection.request.due_on.isoformat()}")
        return 0

    return _rights_transaction(settings, work)


def cmd_privacy_directive(args: argparse.Namespace, settings: Settings) -> int:
    """Record (or show) one person's post-mortem directive."""
    from maildesk.privacy import rights
    from maildesk.store.directory import get_account

    def work(session: Session) -> int:
        if args.directive is None:
            account = get_account(session, args.email)
        else:
            account = rights.set_directive(session, email=args.email, directive=args.directive,
                                           address=args.address, actor=args.actor)
        shown = account.directive or "none (keep)"
        if account.directive_address:
            shown += f" {account.directive_address}"
        print(f"directive of {terminal_safe(account.email)}: {terminal_safe(shown)}")
        return 0

    return _rights_transaction(settings, work)


def cmd_privacy_deceased(args: argparse.Namespace, settings: Settings) -> int:
    """Record a person's death and carry out their directive."""
    from maildesk.privacy import notice, rights
    from maildesk.privacy.erase import ErasureError
    from maildesk.privacy.export import ExportError
    from maildesk.store.directory import get_account

    engine = database.make_engine(settings.store_url)
    try:
        database.check_schema(engine)
        with database.session_scope(engine) as session:
            directive = get_account(session, args.email).directive or "keep"
        if directive == "erase" and not args.yes:
            raise CommandError("the directive is erase: give --yes to erase the account now")
        outcome = rights.carry_out_directive(
            settings, engine, notice.unsigned_notifier(settings), email=args.email,
            actor=args.actor,
        )
    except (ErasureError, ExportError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"the directive could not be carried out: {exc}") from None
    finally:
        engine.dispose()
    email = terminal_safe(args.email.strip().lower())
    if outcome.erased:
        print(f"death of {email} recorded; the account was erased, as directed")
    elif outcome.export_path is not None:
        print(f"death of {email} recorded; export written to {terminal_safe(outcome.export_path)}"
              "; the designated address and the DPO were told, the account is deactivated")
    else:
        print(f"death of {email} recorded; the account is deactivated and its data follow "
              "the retention rules")
    return 0


def cmd_privacy_requests(args: argparse.Namespace, settings: Settings) -> int:
    """List the open rights requests, overdue first."""
    from maildesk.privacy.requests import local_day, open_requests
    from maildesk.store.models import utcnow

    def work(session: Session) -> int:
        today = local_day(settings, utcnow())
        rows = [
            {
                "id": r.request.id, "kind": r.request.kind,
                "ticket": r.request.ticket_id,
                "account": r.account.email if r.account is not None else None,
                "received_at": r.request.received_at.isoformat(),
                "due_on": r.request.due_on.isoformat(), "overdue": r.overdue,
            }
            for r in open_requests(session, today)
        ]
        if args.json:
            print_json(rows)
        else:
            columns = ["id", "kind", "ticket", "account", "due_on", "overdue"]
            table([[row[c] for c in columns] for row in rows], [c.upper() for c in columns])
        return 0

    return _rights_transaction(settings, work)


def cmd_privacy_close_request(args: argparse.Namespace, settings: Settings) -> int:
    """Close a rights request once it is answered."""
    from maildesk.privacy.requests import RequestError, close_request

    def work(session: Session) -> int:
        try:
            request = close_request(session, request_id=args.id, actor=args.actor)
        except RequestError as exc:
            raise CommandError(str(exc)) from None
        print(f"rights request #{request.id} ({request.kind}) closed")
        return 0

    return _rights_transaction(settings, work)


def cmd_privacy_register(args: argparse.Namespace, settings: Settings) -> int:
    """Print the record of processing activities (GDPR Art. 30)."""
    from maildesk.privacy.register import record, to_markdown

    data = record(settings)
    if args.json:
        print_json(data)
    else:
        print(terminal_safe(to_markdown(data), multiline=True), end="")
    return 0


class _DirectiveAction(argparse.Action):
    """--set keep | erase | export-to ADDRESS, as `directive` and `address`."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        directive, *rest = values
        if directive not in ("keep", "erase", "export-to"):
            parser.error(f'--set: expected keep, erase or export-to, got "{directive}"')
        if len(rest) > 1 or (rest and directive != "export-to"):
            parser.error(f"--set {directive}: unexpected {' '.join(rest)}")
        namespace.directive = directive
        namespace.address = rest[0] if rest else None


def _add_rights_parsers(command: Any) -> None:
    """Add the commands of restriction, objection, directives, requests and the register."""
    sub = command("privacy restrict", "restrict the processing of one account's data: kept, "
                  "not processed (new mails notify no agent, nothing reaches US staff)",
                  cmd_privacy_restrict)
    sub.add_argument("email", metavar="EMAIL")
    sub = command("privacy unrestrict", "lift the restriction of one account's data",
                  cmd_privacy_unrestrict)
    sub.add_argument("email", metavar="EMAIL")
    sub = command("privacy object", "record one person's objection to the processing and "
                  "open a ticket for the DPO", cmd_privacy_object)
    sub.add_argument("email", metavar="EMAIL")
    sub = command("privacy directive", "record one person's post-mortem directive (France); "
                  "without --set, show it", cmd_privacy_directive)
    sub.add_argument("email", metavar="EMAIL")
    sub.set_defaults(directive=None, address=None)
    sub.add_argument("--set", dest="directive", nargs="+", action=_DirectiveAction,
                     metavar="DIRECTIVE", help="keep (deactivate), erase (erase everything), "
                     "or export-to ADDRESS (the DPO hands an export to ADDRESS)")
    sub = command("privacy deceased", "record one person's death and carry out their "
                  "directive (none recorded: keep)", cmd_privacy_deceased)
    sub.add_argument("email", metavar="EMAIL")
    sub.add_argument("--yes", action="store_true", help="carry out an erase directive")
    sub = command("privacy requests", "list the open rights requests, overdue first",
                  cmd_privacy_requests)
    sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub = command("privacy close-request", "close a rights request once it is answered",
                  cmd_privacy_close_request)
    sub.add_argument("id", metavar="ID", type=int)
    sub = command("privacy register", "print the record of processing activities (GDPR "
                  "Art. 30) from the config, as Markdown", cmd_privacy_register)
    sub.add_argument("--json", action="store_true", help="print JSON instead of Markdown")


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
    _add_rights_parsers(command)
