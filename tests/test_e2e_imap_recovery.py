"""End to end: the IMAP folders agree with the database after whatever befell the mailbox.

`maildesk run` as a process against Dovecot: a folder recreated with a new UIDVALIDITY and the
same mails in it, Dovecot restarted while the desk idles, and the desk SIGKILLed again and again
while it works through a backlog.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email import policy
from email.parser import BytesHeaderParser
from pathlib import Path

from e2e import CUSTOMER, RunningDesk, customer_mail, running_desk, seed, write_config
from rig.dovecot import DovecotServer, ImapAccount, free_port
from rig.smtp import RecordingSMTPServer
from sqlmodel import func, select

from maildesk.store import database
from maildesk.store.intake import INTAKE_QUEUE
from maildesk.store.models import RECEIVED, InboundMail, Outbox

PROCESSED, QUARANTINE = "maildesk/processed", "maildesk/quarantine"
# Tickets per sender and automatic mail per mailbox are limited: not for these tests.
NO_LIMITS = "[limits]\nautomatic_per_mailbox_per_day = 100000\nbreaker_tickets = 100000\n"


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"


def poll(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until `condition()` holds, or fail saying `what` did not happen."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(0.02)


def message_ids(imap: ImapAccount, folder: str) -> list[str]:
    """The Message-ID of every mail in a folder, in UID order."""
    parser = BytesHeaderParser(policy=policy.default)
    return [str(parser.parsebytes(raw)["Message-ID"]) for raw in imap.fetch_all(folder)]


def inbound_rows(desk: RunningDesk) -> list[InboundMail]:
    with desk.session() as session:
        query = select(InboundMail).order_by(InboundMail.id)  # type: ignore[arg-type]
        return list(session.exec(query))


def count(desk: RunningDesk, *where: object) -> int:
    with desk.session() as session:
        query = select(func.count()).select_from(InboundMail).where(*where)  # type: ignore[arg-type]
        return int(session.exec(query).one())


@contextmanager
def desk_watching(
    tmp_path: Path, imap: ImapAccount, smtp: RecordingSMTPServer, folder: str
) -> Iterator[RunningDesk]:
    """As e2e.running_desk, with `[imap] folder` set to `folder`."""
    port = free_port()
    config = write_config(tmp_path, sqlite_url(tmp_path), imap=imap, smtp=smtp, listener_port=port)
    config.write_text(config.read_text().replace("[imap]\n", f'[imap]\nfolder = "{folder}"\n', 1))
    engine = database.make_engine(sqlite_url(tmp_path))
    database.upgrade(engine)
    seed(engine)
    desk = RunningDesk(tmp_path, config, sqlite_url(tmp_path), engine, port,
                       tmp_path / "maildesk.log")  # fmt: skip
    desk.start()
    try:
        yield desk
    finally:
        code = desk.stop()
        engine.dispose()
        assert code == 0, desk.log_path.read_text()


def test_a_folder_made_anew_with_the_same_mails_files_nothing_twice(
    tmp_path: Path, imap_account: ImapAccount, smtp_server: RecordingSMTPServer
) -> None:
    folder = "support"
    mails = [customer_mail(subject=f"Demande {n}").as_bytes() for n in range(3)]
    with imap_account.client() as client:
        client.create_folder(folder)
        for raw in mails:
            client.append(folder, raw)
    with desk_watching(tmp_path, imap_account, smtp_server, folder) as desk:
        # Each mail: a ticket, its acknowledgement and the agent's copy.
        smtp_server.wait_for(count=6, timeout=30)
        imap_account.wait_for_count(PROCESSED, 3)
        [before] = {row.uidvalidity for row in inbound_rows(desk)}
        with imap_account.client() as client:
            client.delete_folder(folder)
            client.create_folder(folder)
            after = int(client.select_folder(folder)[b"UIDVALIDITY"])
            for raw in mails:
                client.append(folder, raw)
        assert after != before
        imap_account.wait_for_count(PROCESSED, 6, timeout=30)
        assert imap_account.uids(folder) == []
        rows = inbound_rows(desk)
        tickets = desk.tickets()
        outbox = desk.outbox()
    assert len(tickets) == 3
    assert len(outbox) == 6 and len([m for m in outbox if m.kind == "acknowledgement"]) == 3
    assert len(smtp_server.mails) == 6
    # The rows follow their mails to the new UIDVALIDITY, so the next scan finds them stored.
    assert [(row.uidvalidity, row.outcome) for row in rows] == [(after, "ticket")] * 3
    assert imap_account.fetch_all(PROCESSED) == mails + mails
    assert imap_account.uids(QUARANTINE) == []


def test_dovecot_restarted_while_the_desk_idles_is_ridden_out(
    tmp_path: Path, private_dovecot: DovecotServer, smtp_server: RecordingSMTPServer
) -> None:
    account = private_dovecot.add_user()
    with running_desk(tmp_path, sqlite_url(tmp_path), imap=account, smtp=smtp_server) as desk:
        account.append(customer_mail(subject="Avant").as_bytes())
        smtp_server.wait_for(count=2, timeout=30)
        account.wait_for_count(PROCESSED, 1)
        poll(lambda: private_dovecot.idling_sessions() == 1, 10, "the desk did not IDLE")
        pid = desk.process.pid if desk.process else None
        private_dovecot.restart()
        assert private_dovecot.port == account.port
        account.append(customer_mail(subject="Après").as_bytes())
        # The reconnect backoff starts at 1 s and doubles; a few tries are enough.
        acks = smtp_server.wait_for(
            count=2, timeout=30, predicate=lambda m: m.rcpt_tos == [CUSTOMER]
        )  # fmt: skip
        account.wait_for_count(PROCESSED, 2)
        assert desk.process is not None and desk.process.poll() is None
        assert desk.process.pid == pid
        errors = [e for e in desk.log_events() if e.get("event") == "imap.connection_error"]
        tickets = desk.tickets()
    assert errors, "the desk never saw the server go away"
    assert len(acks) == 2 and [t.subject for t in tickets] == ["Avant", "Après"]
    assert account.uids("INBOX") == []


MAILS = 30
STRANGERS = {4, 9, 15, 21, 27}  # positions in the backlog of mails from unknown senders


def test_folders_agree_with_the_database_after_sigkills(
    tmp_path: Path, imap_account: ImapAccount, smtp_server: RecordingSMTPServer
) -> None:
    mails = [
        customer_mail(subject=f"Inconnu {n:02d}", sender=f"visitor{n}@elsewhere.example")
        if n in STRANGERS else customer_mail(subject=f"Demande {n:02d}")
        for n in range(MAILS)
    ]  # fmt: skip
    stranger_ids = {str(mails[n]["Message-ID"]) for n in STRANGERS}
    customer_subjects = sorted(str(m["Subject"]) for n, m in enumerate(mails) if n not in STRANGERS)
    with imap_account.client() as client:
        for mail in mails:
            client.append("INBOX", mail.as_bytes())
    chaos = random.Random(8)  # a reproducible schedule of crashes
    with running_desk(tmp_path, sqlite_url(tmp_path), imap=imap_account, smtp=smtp_server,
                      extra=NO_LIMITS) as desk:  # fmt: skip
        # The named moments first: just after the backlog's commit, before anything is filed
        # or moved; then just after the first mails are filed, before their MOVE.
        poll(lambda: count(desk) > 0, 20, "nothing was stored")
        desk.kill()
        assert imap_account.uids("INBOX") != []
        desk.start()
        poll(lambda: count(desk, InboundMail.outcome != RECEIVED) > 0, 20, "nothing was filed")
        desk.kill()
        # Then at random moments.
        for _ in range(3):
            desk.start()
            time.sleep(chaos.uniform(0.05, 0.6))
            desk.kill()
        desk.start()
        poll(lambda: imap_account.uids("INBOX") == [], 30, "the inbox was not emptied")
        rows = desk.wait_for_inbound(MAILS, timeout=20)
        processed = message_ids(imap_account, PROCESSED)
        quarantined = message_ids(imap_account, QUARANTINE)
        tickets = desk.tickets()
        with desk.session() as session:
            acks = session.exec(select(Outbox).where(Outbox.kind == "acknowledgement")).all()
    assert len(rows) == MAILS, "a mail was stored twice"
    assert sorted(ticket.subject for ticket in tickets) == customer_subjects
    assert len(acks) == MAILS - len(STRANGERS)
    assert {row.message_id for row in rows if row.outcome == "quarantined"} == stranger_ids
    assert {row.reason for row in rows if row.outcome == "quarantined"} == {"unknown sender"}
    # Each mail once, in the folder that its outcome names.
    assert sorted(quarantined) == sorted(stranger_ids)
    assert sorted(processed) == sorted(
        str(row.message_id) for row in rows if row.outcome != "quarantined"
    )
    assert len(processed) + len(quarantined) == MAILS


def test_a_mail_that_kills_the_desk_each_time_is_quarantined_and_the_others_are_filed(
    tmp_path: Path, imap_account: ImapAccount, smtp_server: RecordingSMTPServer
) -> None:
    """The desk dies (SIGKILL) whenever it is at one mail: once that mail has been claimed
    INTAKE_QUEUE.poison_after times without an outcome, it is quarantined, in the database and
    in the quarantine folder, and the mails behind it are filed."""
    killer = customer_mail(subject="Le dossier complet")
    # A 12 MB attachment keeps the runner at the mail for long enough to be caught at it.
    killer.add_attachment(random.Random(3).randbytes(12_000_000), maintype="application",
                          subtype="octet-stream", filename="dump.bin")
    killer_id = str(killer["Message-ID"])
    others = [customer_mail(subject=f"Demande {n}") for n in range(4)]
    with imap_account.client() as client:
        for mail in (killer, *others):
            client.append("INBOX", mail.as_bytes())

    def at_the_killer(claims: int) -> bool:
        """Whether the runner holds the mail's claim number `claims`, without an outcome."""
        # By its size: the row learns its Message-ID only in the filing transaction.
        return count(desk, InboundMail.size > 12_000_000,
                     InboundMail.claimed_by.is_not(None),  # type: ignore[union-attr]
                     InboundMail.outcome == RECEIVED, InboundMail.attempts == claims) == 1

    with running_desk(tmp_path, sqlite_url(tmp_path), imap=imap_account, smtp=smtp_server,
                      extra=NO_LIMITS) as desk:  # fmt: skip
        for claims in range(1, INTAKE_QUEUE.poison_after + 1):
            poll(lambda: at_the_killer(claims), 30, f"claim {claims} of the mail")  # noqa: B023
            desk.kill()
            desk.start()
        rows = desk.wait_for_inbound(len(others) + 1, timeout=30)
        poll(lambda: imap_account.uids("INBOX") == [], 30, "the inbox was not emptied")
        quarantined = message_ids(imap_account, QUARANTINE)
        processed = message_ids(imap_account, PROCESSED)
        tickets = desk.tickets()
    # Never filed, so the row has no Message-ID: it is the one large mail.
    [dead] = [row for row in rows if row.size > 12_000_000]
    assert (dead.outcome, dead.reason) == ("quarantined",
                                           "internal error: the runner stopped while filing it")
    assert dead.attempts == INTAKE_QUEUE.poison_after + 1
    assert quarantined == [killer_id]
    assert sorted(processed) == sorted(str(m["Message-ID"]) for m in others)
    assert sorted(t.subject for t in tickets) == sorted(str(m["Subject"]) for m in others)
