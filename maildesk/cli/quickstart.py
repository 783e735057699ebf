"""The quickstart: maildesk on its embedded defaults, with a demo company, customer and agent.

Demo data are created only by this explicit command, never by `maildesk run` on a real config.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from maildesk.config import DeskSettings, Settings
from maildesk.store import database, directory

DEMO_COMPANY = "Demo Company"
DEMO_CUSTOMER = ("camille@customer.example", "Camille Durand")
DEMO_AGENT = ("alex@vendor.example", "Alex Martin")


def quickstart_settings(state_dir: Path, port: int) -> Settings:
    """The embedded defaults: SQLite, the SMTP listener on loopback, the maildir transport."""
    settings = Settings()
    return settings.model_copy(
        update={
            "desk": DeskSettings(state_dir=state_dir.resolve()),
            "listener": settings.listener.model_copy(update={"port": port}),
        }
    )


def demo_config_path(settings: Settings) -> Path:
    """The config file that the quickstart writes into its demo directory."""
    return settings.desk.state_dir / "config.toml"


def write_demo_config(settings: Settings) -> Path:
    """Write the demo's settings where the other commands can read them with --config."""
    path = demo_config_path(settings)
    # state_dir "." is the config file's own directory: the demo directory can move.
    text = (
        "# Written by `maildesk quickstart`: the demo desk's settings, for the other commands:\n"
        f"#   {show_command(settings, 'tickets list')}\n"
        "[desk]\n"
        'state_dir = "."\n'
        "[listener]\n"
        f'host = "{settings.listener.host}"\n'
        f"port = {settings.listener.port}\n"
        "[smtp]\n"
        'transport = "maildir"\n'
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)  # Never a half-written config, even if the quickstart is killed.
    return path


def show_command(settings: Settings, command: str) -> str:
    """The command line that runs `command` on the demo desk, as one would type it here."""
    path = demo_config_path(settings)
    try:
        shown = str(path.relative_to(Path.cwd()))
    except ValueError:
        shown = str(path)
    # The program as it was called (.venv/bin/maildesk, say), so the line can be pasted.
    program = sys.argv[0] if Path(sys.argv[0]).name == "maildesk" else "maildesk"
    return shlex.join([program, "--config", shown, *command.split()])


def seed_demo(settings: Settings) -> None:
    """Create the schema, the demo people and the demo's config file; running it again
    changes nothing.
    """
    write_demo_config(settings)
    engine = database.make_engine(settings.store_url)
    try:
        database.upgrade(engine)
        with database.session_scope(engine) as session:
            actor = "quickstart"
            if directory.find_company(session, DEMO_COMPANY) is None:
                directory.add_company(session, name=DEMO_COMPANY, after_hours=False, actor=actor)
            email, name = DEMO_CUSTOMER
            if directory.find_account(session, email) is None:
                directory.add_account(
                    session, email=email, name=name, company=DEMO_COMPANY, locale="fr", actor=actor
                )
            email, name = DEMO_AGENT
            if directory.find_agent(session, email) is None:
                directory.add_agent(session, email=email, name=name, region="eu", actor=actor)
    finally:
        engine.dispose()


def instructions(settings: Settings) -> str:
    """What to do next, printed before the daemon starts."""
    host, port = settings.listener.host, settings.listener.port
    return f"""\
maildesk quickstart: state in {settings.desk.state_dir}
  demo customer {DEMO_CUSTOMER[0]} (company "{DEMO_COMPANY}"), demo agent {DEMO_AGENT[0]}
  send a mail as the customer, from another terminal:
    python3 -c 'import smtplib; from email.message import EmailMessage as M; m = M(); \\
m["From"] = "{DEMO_CUSTOMER[0]}"; m["To"] = "{settings.desk.address}"; \\
m["Subject"] = "Bonjour"; m.set_content("Mon export ne marche plus."); \\
smtplib.SMTP("{host}", {port}).send_message(m)'
  then read the acknowledgement and the agent's copy in {settings.outgoing_maildir}/new/
  and look at the demo desk's tickets:
    {show_command(settings, "tickets list")}
  stop with Ctrl-C
"""
