"""A desk with realistic data for the privacy tests: mails filed through the pipeline, their
copies in the rig's Dovecot folders, and ways to look for a person's bytes everywhere.

Claire (the person erased) has a ticket with an attachment, an agent's answer, a follow-up, an
out-of-office reply on no ticket, and an automatic mail without a Message-ID held in quarantine;
Marc, her colleague, has a ticket whose attachment has the same content as one of Claire's; a
stranger's mail waits in quarantine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import pytest
import sqlalchemy as sa
from e2e import AGENT, COLLEAGUE, CUSTOMER, DESK
from rig.dovecot import ImapAccount
from sqlmodel import Session, select

from maildesk.config import ImapSettings, Settings
from maildesk.mail.message import Delivery
from maildesk.pipeline import Pipeline
from maildesk.signing import principal_of_agent, reply_address
from maildesk.store import database, directory
from maildesk.store.models import Account, Ticket

CLAIRE = (b"Claire Dupont", CUSTOMER.encode())
MARC = (b"Marc Petit", COLLEAGUE.encode())
STRANGER = "zoe.inconnue@elsewhere.example"
PROCESSED, QUARANTINE = "maildesk/processed", "maildesk/quarantine"
SHARED = b"%PDF-1.4 shared content of a file both colleagues sent\n"


def mail(
    name: str, sender: str, subject: str, text: str, *, to: str = DESK,
    files: tuple[tuple[str, bytes], ...] = (), message_id: bool = True, **headers: str,
) -> bytes:
    """A mail as a mail client would send it."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = f"{name} <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    if message_id:
        msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    for key, value in headers.items():
        msg[key.replace("_", "-")] = value
    msg.set_content(text)
    for filename, data in files:
        msg.add_attachment(data, maintype="application", subtype="pdf", filename=filename)
    return msg.as_bytes()


@dataclass
class Scene:
    """The desk, its store, and where Claire's and Marc's data are."""

    pipeline: Pipeline
    engine: sa.Engine
    settings: Settings
    imap: ImapAccount | None
    claire_ticket: int
    marc_ticket: int
    inbox_uid: int = 0

    @property
    def state_dir(self) -> Path:
        """The desk's state directory."""
        return self.settings.desk.state_dir

    def file(self, raw: bytes, folder: str | None) -> int | None:
        """File a mail through the pipeline, as the fetcher would from `folder`; its ticket."""
        delivery = Delivery(source="smtp", envelope_from=None, recipients=(DESK,))
        if self.imap is not None and folder is not None:
            # The bytes filed are the server's, exactly as the fetcher would read them.
            uid = self.imap.append(raw, folder)
            with self.imap.client() as client:
                client.select_folder(folder, readonly=True)
                raw = client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]
            # As if fetched from INBOX, then moved to `folder`: INBOX's UIDs only grow.
            self.inbox_uid += 1
            delivery = Delivery(source="imap", mailbox="INBOX", uidvalidity=1,
                                uid=self.inbox_uid)
        return self.pipeline.process(raw, delivery).ticket_id

    def deactivate_claire(self, on: datetime) -> None:
        """Deactivate Claire's account from `on`."""
        with database.session_scope(self.engine) as session:
            directory.deactivate_account(session, email=CUSTOMER, on=on, actor="test")

    def accounts(self) -> set[str]:
        """The addresses of the accounts left."""
        with Session(self.engine) as session:
            return set(session.exec(select(Account.email)))

    def tickets(self) -> set[int]:
        """The tickets left."""
        with Session(self.engine) as session:
            return {t for t in session.exec(select(Ticket.id)) if t is not None}


def database_bytes(engine: sa.Engine) -> bytes:
    """Every value of every table, as bytes: what the database holds, on either engine."""
    chunks = []
    with engine.connect() as connection:
        for table in sa.inspect(connection).get_table_names():
            for row in connection.execute(sa.text(f'SELECT * FROM "{table}"')):  # noqa: S608
                for value in row:
                    chunks.append(value if isinstance(value, bytes) else str(value).encode())
    return b"\n".join(chunks)


def state_bytes(state_dir: Path) -> dict[str, bytes]:
    """Each file under the state directory (the SQLite file and its -wal too), by path."""
    return {str(p.relative_to(state_dir)): p.read_bytes()
            for p in sorted(state_dir.rglob("*")) if p.is_file()}


def imap_bytes(imap: ImapAccount | None) -> list[bytes]:
    """Every mail in the processed and quarantine folders."""
    if imap is None:
        return []
    return imap.fetch_all(PROCESSED) + imap.fetch_all(QUARANTINE)


def places_holding(scene: Scene, needles: tuple[bytes, ...]) -> list[str]:
    """Where any of `needles` (compared case-insensitively) is still found."""
    places = [f"file {name}" for name, data in state_bytes(scene.state_dir).items()
              if any(n.lower() in data.lower() for n in needles)]
    if any(n.lower() in database_bytes(scene.engine).lower() for n in needles):
        places.append("database")
    places += [f"imap mail {i}" for i, data in enumerate(imap_bytes(scene.imap))
               if any(n.lower() in data.lower() for n in needles)]
    return places


def imap_settings(imap: ImapAccount) -> ImapSettings:
    """[imap] for the rig's Dovecot user."""
    return ImapSettings(enabled=True, host=imap.host, port=imap.port, tls="none",
                        username=imap.username, password=imap.password,  # type: ignore[arg-type]
                        idle=False)


def build_scene(pipeline: Pipeline, engine: sa.Engine, imap: ImapAccount | None) -> Scene:
    """File the scene's mails; the folders are made as the fetcher makes them."""
    settings = pipeline.settings
    if imap is not None:
        with imap.client() as client:
            for folder in (PROCESSED, QUARANTINE):
                client.create_folder(folder)
        settings = settings.model_copy(update={"imap": imap_settings(imap)})
    scene = Scene(pipeline, engine, settings, imap, 0, 0)
    claire = scene.file(mail("Claire Dupont", CUSTOMER, "Export PDF en erreur",
                             "Bonjour,\nL'export échoue.\nClaire Dupont, 01 23 45 67 89",
                             files=(("facture-claire.pdf", b"%PDF-1.4 only Claire's invoice\n"),
                                    ("commun.pdf", SHARED))), PROCESSED)
    assert claire is not None
    scene.claire_ticket = claire
    with Session(engine) as session:
        agent = directory.find_agent(session, AGENT)
        assert agent is not None and agent.id is not None
    answer_to = reply_address(pipeline.reply_keys, DESK, claire, principal_of_agent(agent.id))
    assert scene.file(mail("Alice Martin", AGENT, f"Re: [#{claire}]",
                           "Bonjour Claire Dupont, voici la correction.", to=answer_to),
                      PROCESSED) == claire
    assert scene.file(mail("Claire Dupont", CUSTOMER, f"Re: [#{claire}] Export PDF en erreur",
                           "Merci, cela marche. Claire"), PROCESSED) == claire
    assert scene.file(mail("Claire Dupont", CUSTOMER, "Absence", "Je suis absente.",
                           Auto_Submitted="auto-replied"), PROCESSED) is None
    assert scene.file(mail("Claire Dupont", CUSTOMER, "Newsletter", "Liste de diffusion",
                           message_id=False, Precedence="bulk"), QUARANTINE) is None
    marc = scene.file(mail("Marc Petit", COLLEAGUE, "Import CSV", "Bonjour, l'import échoue. Marc",
                           files=(("commun.pdf", SHARED),)), PROCESSED)
    assert marc is not None
    scene.marc_ticket = marc
    assert scene.file(mail("Zoé Inconnue", STRANGER, "Question", "Qui êtes-vous ?"),
                      QUARANTINE) is None
    return scene


@pytest.fixture
def scene(pipeline: Pipeline, engine: sa.Engine, imap_account: ImapAccount) -> Iterator[Scene]:
    """The scene on SQLite and PostgreSQL, with its mails' copies in Dovecot."""
    yield build_scene(pipeline, engine, imap_account)
