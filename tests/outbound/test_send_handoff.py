"""Mail queued while the sender idles is claimed for it by the queuing transaction and handed
over in memory: against the rig's real SMTP server and real SQLite and PostgreSQL stores."""

from __future__ import annotations

import json
import uuid
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from rig.smtp import RecordingSMTPServer

from maildesk.config import DeskSettings, Settings, SmtpSettings
from maildesk.outbound.handoff import SendHandoff, claim_for_sender
from maildesk.outbound.send import LEASE, OUTBOX_QUEUE, OutboxSender, SendReport
from maildesk.store.database import session_scope
from maildesk.store.models import Outbox

OWNER = "host-a:1234"


def settings_for(tmp_path: Path, smtp: RecordingSMTPServer) -> Settings:
    """Settings whose SMTP transport points at the rig server."""
    return Settings(
        desk=DeskSettings(state_dir=tmp_path / "state", address="support@desk.example"),
        smtp=SmtpSettings(transport="smtp", host=smtp.host, port=smtp.port),
    )


def new_row(n: int) -> Outbox:
    """An outbox row holding a rendered acknowledgement, not yet added to a session."""
    message_id = f"<{n}.{uuid.uuid4().hex}@desk.example>"
    msg = EmailMessage()
    msg["From"] = "Support <support@desk.example>"
    msg["To"] = f"customer{n}@example.com"
    msg["Subject"] = f"Accusé de réception {n}"
    msg["Message-ID"] = message_id
    msg.set_content(f"Bonjour,\nvotre demande {n} est enregistrée.\n")
    return Outbox(
        kind="ack", message_id=message_id, mail_from="support@desk.example",
        recipients=json.dumps([f"customer{n}@example.com"]),
        raw=msg.as_bytes(policy=policy.SMTP),
    )  # fmt: skip


def queue_claimed(engine: sa.Engine, handoff: SendHandoff, count: int) -> list[int]:
    """Queue `count` rows in one transaction that claims them for the sender; their ids."""
    rows = [new_row(n) for n in range(count)]
    with handoff.claiming(), session_scope(engine) as session:
        for row in rows:
            session.add(row)
            claim_for_sender(row, session.get_bind())
    return [row.id for row in rows]


def fetch(engine: sa.Engine, row_id: int) -> Outbox:
    """The row as the database has it now."""
    with session_scope(engine) as session:
        row = session.get(Outbox, row_id)
        assert row is not None
        return row


def idle_handoff() -> SendHandoff:
    """A hand-over whose sender is waiting for mail."""
    handoff = SendHandoff(OUTBOX_QUEUE, OWNER, LEASE)
    handoff.set_idle(True)
    return handoff


def test_handed_rows_are_sent_without_a_claim_of_their_own(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    """The sender sends handed rows as they were claimed: one attempt, no second claim."""
    handoff = idle_handoff()
    ids = queue_claimed(engine, handoff, 2)
    row = fetch(engine, ids[0])
    assert (row.status, row.claimed_by, row.attempts) == ("sending", OWNER, 1)
    # Held by the queuing transaction's claim: an ordinary claim, even our own, passes them by.
    plain = OutboxSender(settings_for(tmp_path, smtp_server), engine, owner=OWNER)
    assert plain.send_batch() == SendReport()
    sender = OutboxSender(settings_for(tmp_path, smtp_server), engine, owner=OWNER,
                          handoff=handoff)  # fmt: skip
    assert sender.send_batch() == SendReport(sent=2)
    assert sorted(m.message["Message-ID"] for m in smtp_server.mails) == sorted(
        fetch(engine, i).message_id for i in ids
    )
    for row_id in ids:
        row = fetch(engine, row_id)
        assert (row.status, row.attempts, row.claimed_by) == ("sent", 1, None)
    assert handoff.take() == []
    assert sender.send_batch() == SendReport()


def test_a_sender_with_rows_waiting_accepts_no_more(engine: sa.Engine) -> None:
    """Rows handed but not yet taken stop the next transaction from claiming more."""
    handoff = idle_handoff()
    queue_claimed(engine, handoff, 1)
    assert not handoff.accepting()
    handoff.take()
    assert handoff.accepting()


def test_a_rolled_back_savepoint_hands_nothing_over(engine: sa.Engine) -> None:
    """A mail whose savepoint rolled back queued nothing, so its row is not handed over."""
    handoff = idle_handoff()
    kept, dropped = new_row(1), new_row(2)
    with handoff.claiming(), session_scope(engine) as session:
        session.add(kept)
        claim_for_sender(kept, session.get_bind())
        session.flush()
        savepoint = session.begin_nested()
        session.add(dropped)
        claim_for_sender(dropped, session.get_bind())
        session.flush()
        savepoint.rollback()
    assert [row.id for row in handoff.take()] == [kept.id]
    with session_scope(engine) as session:
        assert session.scalars(sa.select(Outbox.message_id)).all() == [kept.message_id]


def test_a_failed_transaction_hands_nothing_over(engine: sa.Engine) -> None:
    """A transaction that raised committed nothing and hands nothing over."""
    handoff = idle_handoff()
    with pytest.raises(RuntimeError), handoff.claiming(), session_scope(engine) as session:
        row = new_row(1)
        session.add(row)
        claim_for_sender(row, session.get_bind())
        session.flush()
        raise RuntimeError("the mail's filing failed")
    assert handoff.take() == []
    with session_scope(engine) as session:
        assert session.scalars(sa.select(Outbox.id)).all() == []


def test_rows_queued_outside_claiming_stay_pending(engine: sa.Engine) -> None:
    """Without a claiming block (a busy sender), a queued row waits for an ordinary claim."""
    row = new_row(1)
    with session_scope(engine) as session:
        session.add(row)
        claim_for_sender(row, session.get_bind())
    fresh = fetch(engine, row.id)
    assert (fresh.status, fresh.claimed_by, fresh.attempts) == ("pending", None, 0)


def test_a_hand_over_taken_too_late_is_released_and_claimed_afresh(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    """A row claimed more than half a lease ago is given back uncounted and claimed anew."""
    clock = [1000.0]
    handoff = SendHandoff(OUTBOX_QUEUE, OWNER, LEASE, monotonic=lambda: clock[0])
    handoff.set_idle(True)
    [row_id] = queue_claimed(engine, handoff, 1)
    # The sender was busy for more than half the lease before it took the hand-over.
    clock[0] += LEASE.total_seconds() / 2 + 0.1
    sender = OutboxSender(settings_for(tmp_path, smtp_server), engine, owner=OWNER,
                          handoff=handoff)  # fmt: skip
    assert sender.send_batch() == SendReport(sent=1)
    row = fetch(engine, row_id)
    # Released uncounted (back to 0) and counted again by the fresh claim.
    assert (row.status, row.attempts) == ("sent", 1)
    assert len(smtp_server.mails) == 1


def test_the_sender_reads_no_handed_row_back(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    """What the claim would read comes with the hand-over: the rows are sent as handed."""
    handoff = idle_handoff()
    [row_id] = queue_claimed(engine, handoff, 1)
    statements: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(" ".join(statement.split()))

    sender = OutboxSender(settings_for(tmp_path, smtp_server), engine, owner=OWNER,
                          handoff=handoff)  # fmt: skip
    sa.event.listen(engine, "before_cursor_execute", note)
    try:
        assert sender.send_batch() == SendReport(sent=1)
    finally:
        sa.event.remove(engine, "before_cursor_execute", note)
    first_record = next(i for i, st in enumerate(statements) if st.startswith("UPDATE outbox"))
    # Before the outcome is recorded, only the US-transfer check's reads (and none of outbox).
    assert not [st for st in statements[:first_record] if "FROM outbox" in st]
    assert fetch(engine, row_id).status == "sent"


def test_a_crash_between_commit_and_send_sends_once_after_restart(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    """The hand-over dies with the process; the restarted sender takes its claims back."""
    queue_claimed(engine, idle_handoff(), 3)
    # Another instance cannot take them while the dead one's lease runs.
    other = OutboxSender(settings_for(tmp_path, smtp_server), engine, owner="host-b:1")
    assert other.send_batch() == SendReport()
    restarted = OutboxSender(settings_for(tmp_path, smtp_server), engine, owner=OWNER,
                             handoff=SendHandoff(OUTBOX_QUEUE, OWNER, LEASE))  # fmt: skip
    assert restarted.take_back() == 3
    assert restarted.send_batch() == SendReport(sent=3)
    assert len({m.message["Message-ID"] for m in smtp_server.mails}) == 3
    assert len(smtp_server.mails) == 3
    assert restarted.send_batch() == SendReport()
