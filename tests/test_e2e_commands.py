"""An agent works a ticket by mail, end to end: `maildesk run` as a process, the rig's SMTP."""

from __future__ import annotations

import smtplib
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

from e2e import AGENT, CUSTOMER, RunningDesk, customer_mail, running_desk
from rig.smtp import RecordedMail, RecordingSMTPServer
from sqlmodel import select

from maildesk.store.models import Message, Ticket


def send(desk: RunningDesk, mail: EmailMessage) -> None:
    with smtplib.SMTP("127.0.0.1", desk.listener_port) as client:
        client.send_message(mail)


def text_of(mail: RecordedMail) -> str:
    return mail.message.get_body(("plain",)).get_content()  # type: ignore[no-any-return]


def agent_reply(notification: RecordedMail, text: str) -> EmailMessage:
    """An agent's reply from their own client to the Reply-To of the copy they got."""
    parsed = message_from_bytes(notification.raw, policy=policy.default)
    reply = customer_mail(sender=AGENT, to=str(parsed["Reply-To"].addresses[0].addr_spec),
                          subject="Re: [#1] Export PDF en erreur", text=text)
    del reply["From"]
    reply["From"] = f"Alice Martin <{AGENT}>"
    return reply


def test_an_agent_assigns_prioritises_and_answers_in_one_reply(
    tmp_path: Path, smtp_server: RecordingSMTPServer
) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    with running_desk(tmp_path, url, imap=None, smtp=smtp_server) as desk:
        send(desk, customer_mail())
        [notification] = smtp_server.wait_for(count=1, timeout=30,
                                              predicate=lambda m: m.rcpt_tos == [AGENT])
        smtp_server.wait_for(count=1, timeout=30, predicate=lambda m: m.rcpt_tos == [CUSTOMER])
        smtp_server.clear()

        send(desk, agent_reply(notification,
                               "#assign me\n#priority high\n\nMerci, nous regardons."))

        [answer] = smtp_server.wait_for(count=1, timeout=30,
                                        predicate=lambda m: m.rcpt_tos == [CUSTOMER])
        [confirmation] = smtp_server.wait_for(count=1, timeout=30,
                                              predicate=lambda m: m.rcpt_tos == [AGENT])
        [ticket] = desk.tickets()
        assert (ticket.assignee_id, ticket.priority) == (1, "high")
        # The customer gets the answer and nothing of the commands.
        said = text_of(answer).split("\n-- \n", 1)[0]
        assert "Merci, nous regardons." in said
        assert "#assign" not in said and "#priority" not in said and "high" not in said
        # The agent gets one short confirmation of what was applied.
        confirmed = text_of(confirmation)
        assert "#assign me" in confirmed and "#priority high" in confirmed
        assert "Priorité : haute" in confirmed and "Assignée à : Alice Martin" in confirmed
        assert [m.author_kind for m in desk.messages(1)] == ["customer", "agent"]
        assert desk.messages(1)[1].rule == "agent-commands"


def test_a_wrong_command_is_refused_and_a_pending_ticket_closes_in_the_running_daemon(
    tmp_path: Path, smtp_server: RecordingSMTPServer
) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    with running_desk(tmp_path, url, imap=None, smtp=smtp_server) as desk:
        send(desk, customer_mail())
        [notification] = smtp_server.wait_for(count=1, timeout=30,
                                              predicate=lambda m: m.rcpt_tos == [AGENT])
        smtp_server.wait_for(count=1, timeout=30, predicate=lambda m: m.rcpt_tos == [CUSTOMER])
        smtp_server.clear()

        # An unknown command changes nothing; the agent is told why, with the valid ones.
        send(desk, agent_reply(notification, "#frobnicate\n\nMerci."))
        [refusal] = smtp_server.wait_for(count=1, timeout=30,
                                         predicate=lambda m: m.rcpt_tos == [AGENT])
        assert "#frobnicate" in text_of(refusal) and "#assign" in text_of(refusal)
        assert [m.author_kind for m in desk.messages(1)] == ["customer"]
        smtp_server.clear()

        send(desk, agent_reply(notification, "#pending\n\nPouvez-vous nous envoyer le fichier ?"))
        smtp_server.wait_for(count=1, timeout=30, predicate=lambda m: m.rcpt_tos == [CUSTOMER])
        smtp_server.wait_for(count=1, timeout=30, predicate=lambda m: m.rcpt_tos == [AGENT])
        [ticket] = desk.tickets()
        assert ticket.status == "pending"
        smtp_server.clear()

        # Eight days go by without an answer (the ticket's dates move back, the thread's with
        # them): the daemon's clock, on its next start, closes the ticket and tells the customer.
        assert desk.stop() == 0
        with desk.session() as session:
            stored = session.get(Ticket, 1)
            assert stored is not None and stored.status_changed_at is not None
            stored.status_changed_at -= timedelta(days=8)
            session.add(stored)
            for message in session.exec(select(Message).where(Message.ticket_id == 1)):
                message.created_at -= timedelta(days=8)
                session.add(message)
            session.commit()
        desk.start()
        [notice] = smtp_server.wait_for(count=1, timeout=30,
                                        predicate=lambda m: m.rcpt_tos == [CUSTOMER])
        [ticket] = desk.tickets()
        assert ticket.status == "closed"
        assert "[#1]" in str(notice.message["Subject"])
