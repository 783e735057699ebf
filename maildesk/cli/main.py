"""The `maildesk` command: the daemon, the schema, and the directory of the desk's people.

Exit codes: 0 success, 1 a refused or failed operation, 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import shlex
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from maildesk.cli import tickets as cli_tickets
from maildesk.cli.errors import CommandError
from maildesk.cli.output import print_json, table, terminal_safe
from maildesk.config import ConfigError, Settings, config_path, load_settings
from maildesk.logs import configure_logging
from maildesk.privacy import notice
from maildesk.store import database, directory
from maildesk.store.database import StoreError
from maildesk.store.directory import DirectoryError

EXIT_FAILED = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace, Settings], int]

# Modules of `maildesk.cli` that add their own commands: each has `add_parsers(command)`, where
# `command(name, help_text, handler)` returns the new subcommand's parser.
COMMAND_MODULES = ("ticket_list", "ticket_actions", "check", "outbox", "privacy", "audit",
                   "retention", "service", "archive", "status")


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _show(rows: list[dict[str, Any]], columns: Sequence[str], as_json: bool) -> None:
    """Print `rows` as JSON, or as a table of `columns` under their names as headings."""
    if as_json:
        print_json(rows)
    else:
        table([[row.get(c) for c in columns] for row in rows], [c.upper() for c in columns])


def _parse_when(text: str) -> datetime:
    """A date (midnight UTC) or an ISO 8601 timestamp (UTC unless it says otherwise)."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'expected a date like 2026-12-31, got "{text}"'
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _open_store(settings: Settings) -> sa.Engine:
    engine = database.make_engine(settings.store_url)
    database.check_schema(engine)
    return engine


def _in_transaction(settings: Settings, work: Callable[[Session], int]) -> int:
    engine = _open_store(settings)
    try:
        with database.session_scope(engine) as session:
            return work(session)
    finally:
        engine.dispose()


# db


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    """Create or upgrade the schema."""
    engine = database.make_engine(settings.store_url)
    try:
        before, after = database.upgrade(engine)
    finally:
        engine.dispose()
    if before == after:
        print(f"the database is up to date (revision {after})")
    else:
        print(f"the database was upgraded from {before or 'empty'} to revision {after}")
    return 0


def cmd_db_status(args: argparse.Namespace, settings: Settings) -> int:
    """Show the schema revision."""
    engine = database.make_engine(settings.store_url)
    try:
        current, head = database.current_revision(engine), database.head_revision()
    finally:
        engine.dispose()
    print(f"database revision: {current or 'empty'}; this maildesk needs: {head}")
    return 0 if current == head else EXIT_FAILED


# companies


def _company_view(company: Any) -> dict[str, Any]:
    return {"name": company.name, "after_hours": company.after_hours, "active": company.active}


def cmd_companies_add(args: argparse.Namespace, settings: Settings) -> int:
    """Add a company."""

    def work(session: Session) -> int:
        directory.add_company(session, name=args.name, after_hours=args.after_hours, actor=_actor())
        print(f'company "{terminal_safe(args.name)}" added')
        return 0

    return _in_transaction(settings, work)


def cmd_companies_update(args: argparse.Namespace, settings: Settings) -> int:
    """Change a company."""

    def work(session: Session) -> int:
        company = directory.update_company(
            session,
            name=args.name,
            after_hours=args.after_hours,
            active=False if args.inactive else (True if args.active else None),
            actor=_actor(),
        )
        print(f'company "{terminal_safe(company.name)}" updated')
        return 0

    return _in_transaction(settings, work)


def cmd_companies_list(args: argparse.Namespace, settings: Settings) -> int:
    """List companies."""

    def work(session: Session) -> int:
        rows = [_company_view(c) for c in directory.list_companies(session)]
        _show(rows, ["name", "after_hours", "active"], args.json)
        return 0

    return _in_transaction(settings, work)


# accounts


def _account_view(account: Any, company: Any) -> dict[str, Any]:
    return {
        "email": account.email,
        "name": account.name,
        "company": company.name,
        "phone": account.phone,
        "locale": account.locale,
        "created_at": account.created_at.isoformat(),
        "deactivated_at": account.deactivated_at.isoformat() if account.deactivated_at else None,
        "active": directory.account_is_active(account),
    }


def cmd_accounts_add(args: argparse.Namespace, settings: Settings) -> int:
    """Add an account."""

    def work(session: Session) -> int:
        account = directory.add_account(
            session,
            email=args.email,
            name=args.name,
            company=args.company,
            phone=args.phone,
            locale=args.locale,
            actor=_actor(),
        )
        # The person learns of it, with the full privacy notice, in the same transaction.
        notice.welcome(session, settings, [account])
        print(f"account {terminal_safe(account.email)} added; welcome mail with the privacy "
              "notice queued")
        return 0

    return _in_transaction(settings, work)


def cmd_accounts_import(args: argparse.Namespace, settings: Settings) -> int:
    """Import accounts from a CSV file."""
    path = Path(args.file)
    try:
        data = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise CommandError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CommandError(f"{path}: not UTF-8 text; save the CSV as UTF-8") from None

    def work(session: Session) -> int:
        result = directory.import_accounts(session, data, source=str(path), actor=_actor())
        welcomed = notice.welcome(session, settings, result.accounts)
        print(f"{terminal_safe(path)}: {result.created} accounts created, "
              f"{result.unchanged} already present; {len(welcomed)} welcome mails queued")
        return 0

    return _in_transaction(settings, work)


def cmd_accounts_update(args: argparse.Namespace, settings: Settings) -> int:
    """Rectify an account."""

    def work(session: Session) -> int:
        account = directory.update_account(
            session,
            email=args.email,
            name=args.name,
            new_email=args.new_email,
            phone=args.phone,
            locale=args.locale,
            actor=_actor(),
        )
        print(f"account {terminal_safe(account.email)} updated")
        return 0

    return _in_transaction(settings, work)


def cmd_accounts_deactivate(args: argparse.Namespace, settings: Settings) -> int:
    """Deactivate an account."""

    def work(session: Session) -> int:
        before = directory.get_account(session, args.email).deactivated_at
        account = directory.deactivate_account(
            session, email=args.email, on=args.on, timezone=settings.desk.timezone,
            actor=_actor(),
        )
        when = account.deactivated_at.isoformat() if account.deactivated_at else "now"
        if before is not None:
            print(f"account {terminal_safe(account.email)} was already deactivated from {when}; "
                  "that date stays")
        else:
            print(f"account {terminal_safe(account.email)} deactivated from {when}")
        return 0

    return _in_transaction(settings, work)


def cmd_accounts_reactivate(args: argparse.Namespace, settings: Settings) -> int:
    """Reactivate a deactivated account."""

    def work(session: Session) -> int:
        account = directory.reactivate_account(session, email=args.email, actor=_actor())
        print(f"account {terminal_safe(account.email)} reactivated")
        return 0

    return _in_transaction(settings, work)


def cmd_accounts_list(args: argparse.Namespace, settings: Settings) -> int:
    """List accounts."""

    def work(session: Session) -> int:
        rows = [_account_view(a, c) for a, c in directory.list_accounts(session, args.company)]
        _show(rows, ["email", "name", "company", "locale", "active"], args.json)
        return 0

    return _in_transaction(settings, work)


def cmd_accounts_show(args: argparse.Namespace, settings: Settings) -> int:
    """Show one account."""

    from maildesk.store.access_log import operator, record_read

    def work(session: Session) -> int:
        account = directory.get_account(session, args.email)
        company = session.get(directory.Company, account.company_id)
        view = _account_view(account, company)
        # The read is logged in the same transaction, before anything is shown.
        record_read(session, actor=operator(getattr(args, "as_agent", None),
                                            getattr(args, "actor", None)),
                    account_id=account.id, what="account")
        session.commit()
        if args.json:
            print_json(view)
        else:
            for key, value in view.items():
                print(f"{key + ':':16}{terminal_safe(value)}")
        return 0

    return _in_transaction(settings, work)


# agents


def cmd_agents_add(args: argparse.Namespace, settings: Settings) -> int:
    """Add an agent."""

    def work(session: Session) -> int:
        agent = directory.add_agent(
            session, email=args.email, name=args.name, region=args.region, actor=_actor()
        )
        print(f"agent {terminal_safe(agent.email)} added ({terminal_safe(agent.region)})")
        return 0

    return _in_transaction(settings, work)


def cmd_agents_list(args: argparse.Namespace, settings: Settings) -> int:
    """List agents."""

    def work(session: Session) -> int:
        rows = [
            {"email": a.email, "name": a.name, "region": a.region, "active": a.active}
            for a in directory.list_agents(session)
        ]
        _show(rows, ["email", "name", "region", "active"], args.json)
        return 0

    return _in_transaction(settings, work)


def cmd_agents_deactivate(args: argparse.Namespace, settings: Settings) -> int:
    """Deactivate an agent."""

    def work(session: Session) -> int:
        agent = directory.deactivate_agent(session, email=args.email, actor=_actor())
        print(f"agent {terminal_safe(agent.email)} deactivated")
        return 0

    return _in_transaction(settings, work)


# run


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the daemon until SIGTERM or SIGINT."""
    from maildesk.daemon import run_daemon

    return run_daemon(settings)


def cmd_quickstart(args: argparse.Namespace, settings: Settings) -> int:
    """Run the daemon on its embedded defaults with demo data."""
    from maildesk.cli.quickstart import instructions, seed_demo
    from maildesk.daemon import run_daemon

    seed_demo(settings)
    print(instructions(settings), flush=True)
    return run_daemon(settings)


def _quickstart_settings(args: argparse.Namespace) -> Settings:
    from maildesk.cli.quickstart import quickstart_settings

    return quickstart_settings(Path(args.state_dir), args.port)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    from maildesk.cli.parser import build

    return build(
        {
            "run": cmd_run,
            "quickstart": cmd_quickstart,
            "db upgrade": cmd_db_upgrade,
            "db status": cmd_db_status,
            "companies add": cmd_companies_add,
            "companies update": cmd_companies_update,
            "companies list": cmd_companies_list,
            "accounts add": cmd_accounts_add,
            "accounts import": cmd_accounts_import,
            "accounts update": cmd_accounts_update,
            "accounts deactivate": cmd_accounts_deactivate,
            "accounts reactivate": cmd_accounts_reactivate,
            "accounts list": cmd_accounts_list,
            "accounts show": cmd_accounts_show,
            "agents add": cmd_agents_add,
            "agents list": cmd_agents_list,
            "agents deactivate": cmd_agents_deactivate,
            "tickets show": cli_tickets.cmd_tickets_show,
            "quarantine list": cli_tickets.cmd_quarantine_list,
            "quarantine show": cli_tickets.cmd_quarantine_show,
            "quarantine release": cli_tickets.cmd_quarantine_release,
        },
        parse_when=_parse_when,
        quickstart_settings=_quickstart_settings,
        extra=[importlib.import_module(f"maildesk.cli.{name}").add_parsers
               for name in COMMAND_MODULES],
    )


def _fail(message: str, code: int, config: str | None = None) -> int:
    # A hint such as "run `maildesk db upgrade` first" names the config it was given, so that
    # it can be pasted as it is.
    if config is not None:
        message = message.replace("`maildesk ", f"`maildesk --config {shlex.quote(config)} ")
    # Messages quote what they refused, such as a cell of a customer's CSV file.
    print(f"maildesk: error: {terminal_safe(message)}", file=sys.stderr)
    return code


def _refuse_missing_database(args: argparse.Namespace, settings: Settings) -> None:
    """Refuse a command on a SQLite file that does not exist, rather than create it empty."""
    if args.handler is cmd_db_upgrade or getattr(args, "database_may_be_missing", False):
        return
    missing = database.missing_database(settings.store_url)
    if missing is not None:
        raise StoreError(
            f"the database {missing} does not exist; run `maildesk db upgrade` first"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `maildesk` command."""
    for stream in (sys.stdout, sys.stderr):
        # A terminal or pipe that cannot encode a name gets an escape, not a traceback.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        settings = (
            args.embedded_settings(args)
            if getattr(args, "embedded_settings", None)
            else load_settings(config_path(args.config))
        )
        # The daemon logs to stdout, for journald; any other command keeps stdout for its
        # own output, which scripts read, and logs to stderr.
        daemon = handler in (cmd_run, cmd_quickstart)
        configure_logging(settings.log.level, log_format=settings.log.format,
                          stream=sys.stdout if daemon else sys.stderr)
        if not getattr(args, "embedded_settings", None):
            _refuse_missing_database(args, settings)
        args.actor = _actor()
        return handler(args, settings)
    except ConfigError as exc:
        print(terminal_safe(exc), file=sys.stderr)
        return EXIT_USAGE
    except (DirectoryError, StoreError, CommandError) as exc:
        return _fail(str(exc), EXIT_FAILED, args.config)
    except sa.exc.OperationalError as exc:
        return _fail(f"the database is unavailable: {exc.orig}", EXIT_FAILED, args.config)
    except KeyboardInterrupt:
        return 130
