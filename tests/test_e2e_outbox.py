"""End to end: the outbox against a relay that refuses, fails for good, or is down for a while.

Retries are given by time, never by a count: the daemon runs with a short first retry (0.2 s,
doubling to 1 s) so that what takes hours in production takes seconds here.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from e2e import AGENT, CUSTOMER, customer_mail, running_desk
from rig.smtp import RecordingSMTPServer
from sqlmodel import select

from maildesk.store.models import AuditEvent, Outbox

FAST_RETRIES = "retry_first_seconds = 0.2\nretry_most_seconds = 1\n"


def send_to_desk(port: int, subject: str = "L'export PDF ne marche plus") -> None:
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.send_message(customer_mail(subject=subject))


def wait_until(condition, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def outbox_rows(desk, kind: str | None = None) -> list[Outbox]:  # type: ignore[no-untyped-def]
    with desk.session() as session:
        query = select(Outbox).order_by(Outbox.id)  # type: ignore[arg-type]
        if kind is not None:
            query = query.where(Outbox.kind == kind)
        return list(session.exec(query))


def test_451_three_times_then_250_delivers_once_with_growing_gaps(
    tmp_path: Path, smtp_server: RecordingSMTPServer
) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    with running_desk(tmp_path, url, imap=None, smtp=smtp_server,
                      smtp_extra=FAST_RETRIES) as desk:  # fmt: skip
        smtp_server.fail_next(451, count=3, stage="rcpt")
        send_to_desk(desk.listener_port)
        [ack] = wait_until(
            lambda: [r for r in outbox_rows(desk, "acknowledgement") if r.status == "sent"],
            20, "the acknowledgement sent",
        )  # fmt: skip
        wait_until(lambda: all(r.status == "sent" for r in outbox_rows(desk)), 20, "all sent")
        deferred = [
            e for e in desk.log_events()
            if e.get("event") == "mail deferred" and e.get("outbox_id") == ack.id
        ]  # fmt: skip
    delivered = [m for m in smtp_server.mails if m.accepted and m.rcpt_tos == [CUSTOMER]]
    assert len(delivered) == 1, "one delivery, however many refusals"
    assert str(delivered[0].message["Message-ID"]) == ack.message_id
    # The three refusals fell on the acknowledgement and the agent's copy, sent in that order.
    assert 1 <= ack.deferrals == len(deferred) <= 3
    gaps = [
        (datetime.fromisoformat(e["retry_at"]) - datetime.fromisoformat(e["timestamp"]))
        .total_seconds()
        for e in deferred
    ]
    # 0.2 s doubling, less up to 20% of jitter: each wait longer than the one before.
    assert gaps == sorted(gaps) and gaps[0] < 0.25
    if len(gaps) > 1:
        assert gaps[1] > 0.3


def test_a_550_is_not_retried_and_is_recorded_on_the_ticket(
    tmp_path: Path, smtp_server: RecordingSMTPServer
) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    with running_desk(tmp_path, url, imap=None, smtp=smtp_server,
                      smtp_extra=FAST_RETRIES) as desk:  # fmt: skip
        smtp_server.fail_next(550, count=1, stage="rcpt",
                              message="5.1.1 <claire> mailbox unknown")  # fmt: skip
        send_to_desk(desk.listener_port)
        [ack] = wait_until(
            lambda: [r for r in outbox_rows(desk, "acknowledgement") if r.status == "failed"],
            20, "the acknowledgement failed",
        )  # fmt: skip
        [notice] = wait_until(
            lambda: [r for r in outbox_rows(desk, "undeliverable") if r.status == "sent"],
            20, "the agents told",
        )  # fmt: skip
        with desk.session() as session:
            events = session.exec(
                select(AuditEvent).where(AuditEvent.action == "mail.failed")
            ).all()
        shown = desk_cli(desk, "tickets", "show", "1")
    assert ack.deferrals == 0 and ack.attempts == 1
    reason = f"all recipients refused: {CUSTOMER} (550 5.1.1 <claire> mailbox unknown)"
    assert ack.last_error == reason
    assert json.loads(notice.recipients) == [AGENT]
    [event] = events
    detail = json.loads(event.detail or "{}")
    assert (event.ticket_id, detail["outbox"], detail["kind"], detail["recipients"]) == (
        1, ack.id, "acknowledgement", [CUSTOMER])
    # No retry: one attempt at the customer's address, ever.
    assert sum(CUSTOMER in m.rcpt_tos for m in smtp_server.attempts) <= 1
    assert f"mail.failed: outgoing mail {ack.id} (acknowledgement) to {CUSTOMER}: {reason}" in shown


def desk_cli(desk, *args: str) -> str:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "maildesk", "--config", str(desk.config), *args],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return result.stdout


def test_a_relay_down_for_a_while_loses_and_gives_up_nothing(
    tmp_path: Path, smtp_server: RecordingSMTPServer
) -> None:
    """Down long enough for far more tries than the old budget of 10 (retries at most every
    0.5 s, for 12 s): nothing is given up before the deadline, and every mail is delivered once
    the relay is back."""
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    port = smtp_server.port
    retries = "retry_first_seconds = 0.2\nretry_most_seconds = 0.5\n"
    with running_desk(tmp_path, url, imap=None, smtp=smtp_server,
                      smtp_extra=retries) as desk:  # fmt: skip
        smtp_server.stop()
        for n in range(5):
            send_to_desk(desk.listener_port, subject=f"Question {n}")
        wait_until(lambda: len(outbox_rows(desk)) == 10, 20, "ten mails queued")
        down_since = time.monotonic()
        while time.monotonic() - down_since < 12:
            assert not [r for r in outbox_rows(desk) if r.status == "failed"]
            time.sleep(1)
        tries = max(r.deferrals for r in outbox_rows(desk))
        smtp_server.start(port)
        wait_until(lambda: all(r.status == "sent" for r in outbox_rows(desk)), 20, "all sent")
    assert tries > 10
    to_customer = [m for m in smtp_server.mails if m.accepted and m.rcpt_tos == [CUSTOMER]]
    assert len(to_customer) == 5
