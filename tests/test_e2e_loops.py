"""Loops, end to end: an auto-responder and a second desk each get a bounded number of mails."""

from __future__ import annotations

import smtplib
import time
from email.message import EmailMessage
from pathlib import Path

from e2e import CUSTOMER, DESK, RunningDesk, customer_mail, running_desk
from rig.dovecot import free_port
from rig.smtp import RecordingSMTPServer
from sqlalchemy import text

from maildesk.store import database


def send(port: int, mail: EmailMessage) -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.send_message(mail)


def wait_until_settled(desk: RunningDesk, received: int, timeout: float = 30) -> None:
    """Wait until every mail sent to the desk is filed and its outbox is drained."""
    desk.wait_for_inbound(received, timeout=timeout)
    deadline = time.monotonic() + timeout
    while any(row.status in ("pending", "sending") for row in desk.outbox()):
        if time.monotonic() > deadline:
            raise AssertionError("the outbox did not drain")
        time.sleep(0.05)


def test_an_auto_responder_without_auto_submitted_loops_a_bounded_number_of_times(
    tmp_path: Path, smtp_server: RecordingSMTPServer
) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    with running_desk(tmp_path, url, imap=None, smtp=smtp_server) as desk:
        # The responder answers every mail the desk sends it with a new, unthreaded mail that
        # looks written by a person: no Auto-Submitted, no In-Reply-To, a new subject.
        received, answered = 1, 0
        send(desk.listener_port, customer_mail(subject="Question 0"))
        while True:
            wait_until_settled(desk, received)
            to_responder = [m for m in smtp_server.mails if m.rcpt_tos == [CUSTOMER]]
            if len(to_responder) == answered:
                break
            for index in range(answered, len(to_responder)):
                send(desk.listener_port, customer_mail(subject=f"Question {index + 1}"))
                received += 1
            answered = len(to_responder)
            assert received < 100, "the loop did not stop"
        # The breaker (over 10 tickets in 10 minutes) stops the acknowledgements, so the
        # responder has nothing left to answer: 11 tickets, 10 acknowledgements, then silence.
        assert (len(desk.tickets()), answered) == (11, 10)
        breaker = [e for e in desk.log_events() if e.get("event", "").startswith("breaker")]
        assert len(breaker) == 1 and breaker[0]["level"] == "warning"


def test_two_desks_pointed_at_each_other_exchange_one_mail(tmp_path: Path) -> None:
    """Desk A's relay is desk B's listener and the reverse; each knows the other as a customer."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    a_port, b_port = free_port(), free_port()
    b_sink = _Relay(b_port)
    a_sink = _Relay(a_port)
    other_desk = "support@other-desk.example"
    with running_desk(a_dir, f"sqlite:///{a_dir / 'a.sqlite3'}", imap=None, smtp=b_sink,  # type: ignore[arg-type]
                      listener_port=a_port) as a, \
         running_desk(b_dir, f"sqlite:///{b_dir / 'b.sqlite3'}", imap=None, smtp=a_sink,  # type: ignore[arg-type]
                      listener_port=b_port, desk_address=other_desk) as b:
        for desk, customer in ((a, other_desk), (b, DESK)):
            with database.session_scope(desk.engine) as session:
                session.execute(text("UPDATE account SET email = :e WHERE email = :old"),
                                {"e": customer, "old": CUSTOMER})
        # A mail in B's name starts it: A opens a ticket and acknowledges it to B's desk.
        send(a_port, customer_mail(sender=other_desk, subject="Bonjour"))
        wait_until_settled(a, 1)
        wait_until_settled(b, 1)
        [seen_by_b] = b.wait_for_inbound(1)
        # B recognises an automatic mail of another desk and answers nothing: silence.
        assert seen_by_b.outcome == "ignored" and seen_by_b.reason.startswith("automatic: ")
        assert [row.kind for row in b.outbox()] == []
        assert len(a.wait_for_inbound(1)) == 1
        assert [row.kind for row in a.outbox(kind="acknowledgement")] == ["acknowledgement"]


class _Relay:
    """The host and port of another desk's listener, posing as the relay of the first."""

    host = "127.0.0.1"

    def __init__(self, port: int) -> None:
        self.port = port
