"""The `install-service` command: maildesk as a systemd service, from a checkout or a wheel."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from maildesk.cli.errors import CommandError
from maildesk.cli.output import terminal_safe
from maildesk.config import Settings
from maildesk.ops import service


def cmd_install_service(args: argparse.Namespace, settings: Settings) -> int:
    """Install the config directory and the units, upgrade the schema, start the service."""
    root = Path(args.root).absolute()
    on_target = root == Path("/")
    if on_target and os.geteuid() != 0:
        raise CommandError("install-service writes /etc and talks to systemd: run it as root")
    try:
        program = Path(args.program).absolute() if args.program else service.console_script()
        service.check_reachable(program)
        steps = service.install(
            root, program, start=not args.no_start and on_target and service.systemd_running()
        )
    except (service.ServiceError, OSError) as exc:
        raise CommandError(str(exc)) from None
    for step in steps:
        print(f"{step.state}: {terminal_safe(step.text)}")
    return 1 if any(step.state == "failed" for step in steps) else 0


def _no_config(args: argparse.Namespace) -> Settings:
    # The config is what this command creates: none is read.
    return Settings()


def add_parsers(command: Any) -> None:
    """Add `install-service` to the parser."""
    sub = command(
        "install-service",
        "install maildesk as a systemd service: /etc/maildesk/config.toml from the sample "
        "(an existing one is kept), the units running this maildesk, `db upgrade`, then "
        "enable and start them",
        cmd_install_service,
    )
    sub.add_argument(
        "--root", default="/", metavar="DIR",
        help="install under DIR instead of / (an image, a test): nothing outside it is "
        "touched and nothing is started; the schema is upgraded only with a config already "
        "in DIR/etc/maildesk",
    )  # fmt: skip
    sub.add_argument(
        "--program", metavar="PATH",
        help="the maildesk command the units run (default: the one beside this Python, "
        "else the one on PATH)",
    )  # fmt: skip
    sub.add_argument("--no-start", action="store_true", help="enable the units, start nothing")
    sub.set_defaults(embedded_settings=_no_config)
