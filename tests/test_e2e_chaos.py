"""End to end under SIGKILL: a backlog filed by a daemon killed again and again at random.

The queues' promise: no mail lost, no ticket doubled, every acknowledgement delivered soon after
the last restart, and a mail delivered twice (at least once is the contract) only ever under the
same Message-ID.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

from e2e import CUSTOMER, RunningDesk, customer_mail, running_desk
from rig.dovecot import ImapAccount
from rig.smtp import RecordingSMTPServer
from sqlmodel import select

from maildesk.store.models import InboundMail, Outbox, Ticket

MAILS = 200
KILLS = 10
# Automatic mail to one mailbox is limited, and so are tickets per sender: not for this test.
NO_LIMITS = (
    "[limits]\nautomatic_per_mailbox_per_day = 100000\nbreaker_tickets = 100000\n"
)


def folder_count(imap: ImapAccount, folder: str) -> int:
    with imap.client() as client:
        if not client.folder_exists(folder):
            return 0
        return len(client.search("ALL")) if client.select_folder(folder) else 0


def unsent_acknowledgements(desk: RunningDesk) -> int:
    """How many acknowledgements the desk has not yet recorded as sent."""
    with desk.session() as session:
        rows = session.exec(select(Outbox).where(Outbox.kind == "acknowledgement")).all()
    return sum(row.status != "sent" for row in rows)


def test_sigkill_at_random_loses_nothing_and_doubles_nothing(
    tmp_path: Path, imap_account: ImapAccount, smtp_server: RecordingSMTPServer
) -> None:
    subjects = [f"Demande {n:03d}" for n in range(MAILS)]
    with imap_account.client() as client:
        for subject in subjects:
            client.append("INBOX", customer_mail(subject=subject).as_bytes())
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    chaos = random.Random(8)  # A reproducible schedule of crashes.
    with running_desk(tmp_path, url, imap=imap_account, smtp=smtp_server,
                      extra=NO_LIMITS) as desk:  # fmt: skip
        kills = 0
        while kills < KILLS:
            # The moments vary: right after start-up, in the middle of a batch, while sending.
            time.sleep(chaos.uniform(0.05, 0.9))
            desk.kill()
            kills += 1
            desk.start()
        restarted = time.monotonic()
        # Every acknowledgement reaches the relay within 30 s of the last restart; copies sent
        # again after a crash count once.
        acks: Counter[str] = Counter()
        while time.monotonic() - restarted < 30 and len(acks) < MAILS:
            acks = Counter(
                str(m.message["Message-ID"]) for m in list(smtp_server.mails)
                if m.rcpt_tos == [CUSTOMER] and m.accepted
            )  # fmt: skip
            time.sleep(0.1)
        delivered_in = time.monotonic() - restarted
        # The relay's 250 comes before the sender records the row sent: that record is given
        # the rest of the same 30 s.
        while time.monotonic() - restarted < 30 and unsent_acknowledgements(desk):
            time.sleep(0.1)
        with desk.session() as session:
            tickets = session.exec(select(Ticket)).all()
            inbound = session.exec(select(InboundMail)).all()
            outbox = session.exec(select(Outbox)).all()
    outcomes = Counter((row.outcome, row.reason) for row in inbound)
    assert len(acks) == MAILS, f"{len(acks)} acknowledgements in 30 s; mails: {outcomes}"
    assert delivered_in < 30
    assert len(inbound) == MAILS and outcomes == Counter({("ticket", None): MAILS})
    assert sorted(t.subject for t in tickets) == subjects, "a mail lost or a ticket doubled"
    ack_ids = {row.message_id for row in outbox if row.kind == "acknowledgement"}
    assert len(ack_ids) == MAILS, "one acknowledgement per ticket"
    # At least once: a copy sent again after a crash carries the same Message-ID.
    assert set(acks) == ack_ids
    assert all(row.status == "sent" for row in outbox if row.kind == "acknowledgement")
    assert folder_count(imap_account, "INBOX") == 0
    assert folder_count(imap_account, "maildesk/processed") == MAILS
