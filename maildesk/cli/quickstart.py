"""The quickstart: maildesk on its embedded defaults, with a demo company, customer and agent.

Demo data are created only by this explicit command, never by `maildesk run` on a real config.
"""

from __future__ import annotations

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


def seed_demo(settings: Settings) -> None:
    """Create the schema and the demo people; running it again changes nothing."""
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
  stop with Ctrl-C
"""
