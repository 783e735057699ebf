"""The `check` command: probe the store, IMAP, the relay, the listener, agents and trust."""

from __future__ import annotations

import argparse
from typing import Any

from maildesk.cli.output import terminal_safe
from maildesk.config import Settings
from maildesk.ops.check import run_probes


def _secrets(settings: Settings) -> list[str]:
    """Every secret of the config, so that no line can show one, whatever a server echoed."""
    values = [settings.imap.password, settings.smtp.password, settings.security.reply_key]
    values += [entry.key for entry in settings.security.reply_keys]
    return [v.get_secret_value() for v in values if v is not None and v.get_secret_value()]


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """Print one line per probe; exit 1 if any failed (warnings do not fail)."""
    secrets = _secrets(settings)
    failed = False
    for finding in run_probes(settings):
        line = finding.line
        for secret in secrets:
            line = line.replace(secret, "********")
        print(terminal_safe(line), flush=True)
        failed = failed or finding.state == "FAIL"
    return 1 if failed else 0


def add_parsers(command: Any) -> None:
    """Add `check` to the parser."""
    sub = command(
        "check",
        "check the config against the world: the store and its schema, IMAP login and "
        "folders, the relay (no mail is sent), the listener's port, agents, trust; "
        "exit 1 if anything failed",
        cmd_check,
    )
    # A missing database is one of the findings, not a reason to refuse the command.
    sub.set_defaults(database_may_be_missing=True)
