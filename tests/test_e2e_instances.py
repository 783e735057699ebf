"""End to end: three daemons on one PostgreSQL, one mailbox and one shared state directory.

One instance at a time reads the mailbox (a lease in the database); all three file and send
(claims with SKIP LOCKED on the database's clock). One is SIGKILLed in the middle of a backlog:
every mail is still filed once and acknowledged once, under one shared reply key.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

from e2e import CUSTOMER, RunningDesk, customer_mail, seed, write_config
from rig.dovecot import ImapAccount, free_port
from rig.smtp import RecordingSMTPServer
from sqlmodel import select

from maildesk.store import database
from maildesk.store.models import DeskSecret, InboundMail, Outbox, Ticket

MAILS = 60
NO_LIMITS = "[limits]\nautomatic_per_mailbox_per_day = 100000\nbreaker_tickets = 100000\n"


def test_three_daemons_share_the_work_and_survive_losing_one(
    tmp_path: Path, postgres_url: str, imap_account: ImapAccount,
    smtp_server: RecordingSMTPServer,
) -> None:  # fmt: skip
    engine = database.make_engine(postgres_url)
    database.upgrade(engine)
    seed(engine)
    shared_state = tmp_path / "shared"
    desks = []
    for n in range(3):
        home = tmp_path / f"instance{n}"
        home.mkdir()
        config = write_config(home, postgres_url, imap=imap_account, smtp=smtp_server,
                              listener_port=free_port(), extra=NO_LIMITS)  # fmt: skip
        # The same state directory for all three: raw mails and attachments are shared.
        text = config.read_text().replace(str(home / "state"), str(shared_state))
        # The config's own reply key would hide the shared one: this desk makes its key itself.
        text = text.replace('reply_key = "test-reply-key"\n', "")
        # One host, one state directory: each needs a name of its own.
        config.write_text(text.replace("[desk]\n", f'[desk]\ninstance = "desk{n}"\n'))
        desks.append(RunningDesk(home, config, postgres_url, engine, 0, home / "maildesk.log"))
    try:
        for desk in desks:
            desk.start()
        with imap_account.client() as client:
            for n in range(MAILS):
                client.append("INBOX", customer_mail(subject=f"Demande {n:02d}").as_bytes())
        # Killed once the backlog is under way, whichever it is.
        deadline = time.monotonic() + 30
        while True:
            with desk.session() as session:
                if len(session.exec(select(Ticket)).all()) >= 10:
                    break
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.05)
        victim = random.Random(3).choice(desks)  # A reproducible choice.
        victim.kill()
        acks: Counter[str] = Counter()
        deadline = time.monotonic() + 60
        while len(acks) < MAILS and time.monotonic() < deadline:
            acks = Counter(
                str(m.message["Message-ID"]) for m in list(smtp_server.mails)
                if m.rcpt_tos == [CUSTOMER] and m.accepted
            )  # fmt: skip
            time.sleep(0.1)
        with desks[0].session() as session:
            tickets = session.exec(select(Ticket)).all()
            inbound = session.exec(select(InboundMail)).all()
            outbox = session.exec(select(Outbox)).all()
            secrets = session.exec(select(DeskSecret)).all()
        readers = [d for d in desks if any(e.get("event") == "imap.selected"
                                           for e in d.log_events())]  # fmt: skip
        standby = [d for d in desks if any(e.get("event") == "imap.standby"
                                           for e in d.log_events())]  # fmt: skip
    finally:
        for desk in desks:
            if desk is not victim:
                assert desk.stop() == 0, desk.log_path.read_text()
        engine.dispose()
    assert len(acks) == MAILS, f"{len(acks)} of {MAILS} acknowledged"
    assert sorted(t.subject for t in tickets) == [f"Demande {n:02d}" for n in range(MAILS)]
    assert len(inbound) == MAILS and {row.outcome for row in inbound} == {"ticket"}
    assert {row.message_id for row in outbox if row.kind == "acknowledgement"} == set(acks)
    # One key, made once in the database, signs for all three.
    assert [s.name for s in secrets] == ["reply_key"]
    # The mailbox was read by one instance at a time; the others stood by.
    assert standby, "no instance stood by"
    assert 1 <= len(readers) <= 2
    # Each instance filed some of the work: the claims are shared, not serialised.
    filers = [d for d in desks if any(e.get("event") == "mail processed" for e in d.log_events())]
    assert len(filers) >= 2
