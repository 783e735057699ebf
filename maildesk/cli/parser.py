"""The argument parser of the `maildesk` command, kept apart from what the commands do."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime
from typing import Any

from maildesk import __version__

Handler = Callable[..., int]


def _day(text: str) -> date:
    """A calendar day, YYYY-MM-DD."""
    try:
        # Python also reads 20261231 and week dates; only the one plain form is documented.
        if len(text) == 10:
            return date.fromisoformat(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f'expected a date like 2026-12-31, got "{text}"')


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build(
    handlers: Mapping[str, Handler],
    *,
    parse_when: Callable[[str], datetime],
    quickstart_settings: Callable[[argparse.Namespace], Any],
    extra: Sequence[Callable[[Any], None]] = (),
) -> argparse.ArgumentParser:
    """Build the parser; `handlers` maps "group command" names to their functions, and each of
    `extra` adds more commands by calling `command(name, help_text, handler)`.
    """
    parser = argparse.ArgumentParser(
        prog="maildesk",
        description="An email-driven customer support desk.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="the config file (default: $MAILDESK_CONFIG, else ./config.toml)",
    )
    parser.add_argument("--version", action="version", version=f"maildesk {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    groups: dict[str, Any] = {}

    def command(
        name: str, help_text: str, handler: Handler | None = None
    ) -> argparse.ArgumentParser:
        group_name, _, leaf = name.partition(" ")
        if not leaf:
            sub = commands.add_parser(name, help=help_text, description=help_text)
        else:
            if group_name not in groups:
                group = commands.add_parser(group_name, help=f"{group_name} commands")
                groups[group_name] = group.add_subparsers(title="commands", metavar="COMMAND")
                group.set_defaults(handler=None)
            sub = groups[group_name].add_parser(leaf, help=help_text, description=help_text)
        sub.set_defaults(handler=handler or handlers[name])
        return sub

    command("run", "run the daemon until SIGTERM or SIGINT")
    sub = command(
        "quickstart",
        "try maildesk: run on the embedded defaults (SQLite, SMTP listener on loopback, "
        "outgoing mail to a maildir) with a demo company, customer and agent; no config file",
    )
    sub.add_argument("--state-dir", default="maildesk-demo", help="default: ./maildesk-demo")
    sub.add_argument("--port", type=int, default=2525, help="the SMTP listener's port")
    sub.set_defaults(embedded_settings=quickstart_settings)

    command("db upgrade", "create the database schema, or upgrade it to this version")
    command("db status", "show whether the database schema is up to date")

    sub = command("companies add", "add a customer company")
    sub.add_argument("name", metavar="NAME")
    sub.add_argument(
        "--after-hours",
        action="store_true",
        help="the company subscribed to after-hours support (US staff may see its data)",
    )
    sub = command("companies update", "change a company's subscription or status")
    sub.add_argument("name", metavar="NAME")
    hours = sub.add_mutually_exclusive_group()
    hours.add_argument("--after-hours", dest="after_hours", action="store_true", default=None)
    hours.add_argument("--no-after-hours", dest="after_hours", action="store_false")
    status = sub.add_mutually_exclusive_group()
    status.add_argument("--inactive", action="store_true", help="mark the company inactive")
    status.add_argument("--active", action="store_true", help="mark the company active again")
    _json_flag(command("companies list", "list the companies"))

    sub = command("accounts add", "add a person whom their company authorised")
    sub.add_argument("--email", required=True, help="their email address (mandatory)")
    sub.add_argument("--name", required=True)
    sub.add_argument("--company", required=True, help="an existing company's name")
    sub.add_argument("--phone")
    sub.add_argument("--locale", choices=("fr", "en"), default="fr")
    sub = command("accounts import", "import the CSV file that a company sends")
    sub.add_argument(
        "file", metavar="FILE.csv", help="header row, then columns email,name,company,phone,locale"
    )
    sub = command("accounts update", "rectify an account")
    sub.add_argument("email", metavar="EMAIL")
    sub.add_argument("--name")
    sub.add_argument("--email", dest="new_email", metavar="NEW", help="a new email address")
    sub.add_argument("--phone", help='a new phone number ("" removes it)')
    sub.add_argument("--locale", choices=("fr", "en"))
    sub = command("accounts deactivate", "deactivate an account; retention counts from then")
    sub.add_argument("email", metavar="EMAIL")
    sub.add_argument(
        "--on", type=_day, metavar="DATE",
        help="the day of deactivation, from its midnight in [desk] timezone (default: now); "
        "an account already deactivated keeps its first date",
    )
    sub = command("accounts reactivate", "let a deactivated account open tickets again")
    sub.add_argument("email", metavar="EMAIL")
    sub = command("accounts list", "list the accounts")
    sub.add_argument("--company", help="only this company's accounts")
    _json_flag(sub)
    sub = command("accounts show", "show one account")
    sub.add_argument("email", metavar="EMAIL")
    _json_flag(sub)

    sub = command("agents add", "add a support agent")
    sub.add_argument("--email", required=True)
    sub.add_argument("--name", required=True)
    sub.add_argument("--region", required=True, choices=("eu", "us"))
    _json_flag(command("agents list", "list the agents"))
    sub = command("agents deactivate", "stop sending tickets to an agent")
    sub.add_argument("email", metavar="EMAIL")

    from maildesk.cli.tickets import add_parsers

    add_parsers(command)
    for add_more in extra:
        add_more(command)

    return parser
