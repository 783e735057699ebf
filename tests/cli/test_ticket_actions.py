"""`maildesk tickets revoke`, run as a process on a store that a real pipeline filed mail in."""

from __future__ import annotations

import getpass
from email import message_from_bytes, policy
from pathlib import Path

import sqlalchemy as sa
from e2e import AGENT, CUSTOMER, DESK, customer_mail
from sqlmodel import Session, select
from support_fixtures import make_desk

from maildesk.mail.message import Delivery
from maildesk.pipeline import Pipeline
from maildesk.signing import principal_of_agent, reply_address
from maildesk.store.models import AuditEvent, Outbox, Ticket

SMTP = Delivery(source="smtp", envelope_from=CUSTOMER, recipients=(DESK,))


def agent_reply(to: str) -> bytes:
    """The EU agent's answer to ticket 1, sent to `to`."""
    return customer_mail(sender=AGENT, to=to, subject="Re: [#1] Export PDF en erreur",
                         text="Bonjour Claire, le correctif est en ligne.").as_bytes()


def answers(engine: sa.Engine) -> list[Outbox]:
    with Session(engine) as session:
        return list(session.exec(select(Outbox).where(Outbox.kind == "answer")))


def test_revoke_makes_earlier_reply_addresses_worthless(
    pipeline: Pipeline, engine: sa.Engine, store_url: str, tmp_path: Path
) -> None:
    desk = make_desk(tmp_path, store_url)
    pipeline.process(customer_mail().as_bytes(), SMTP)
    # The address the agent got in the new-ticket notice, before the revoke.
    with Session(engine) as session:
        [notice] = session.exec(select(Outbox).where(Outbox.kind == "new_ticket")).all()
    issued = message_from_bytes(notice.raw, policy=policy.default)["Reply-To"].addresses[0]
    assert issued.addr_spec == reply_address(pipeline.reply_keys, DESK, 1, principal_of_agent(1))

    result = desk.cli("tickets", "revoke", "1", "--as", "alice.martin")
    assert (result.code, result.err) == (0, "")
    assert result.out == (
        "ticket #1: every reply address issued so far is revoked (reply epoch 1); "
        "new mails carry new ones\n"
    )

    refused = pipeline.process(agent_reply(issued.addr_spec), SMTP)
    # Its token no longer verifies, so the agent's mail is held for a person to look at.
    assert (refused.outcome, refused.reason) == (
        "quarantined", "agent mail without a signed reply address"
    )
    assert answers(engine) == []
    with Session(engine) as session:
        ticket = session.get(Ticket, 1)
        assert ticket is not None and ticket.reply_epoch == 1
        events = session.exec(
            select(AuditEvent).where(AuditEvent.action == "ticket.reply_addresses_revoked")
        ).all()
    assert [(e.actor, e.ticket_id) for e in events] == [("alice.martin", 1)]

    # The addresses of the new epoch still work: only the earlier ones were revoked.
    fresh = reply_address(pipeline.reply_keys, DESK, 1, principal_of_agent(1), epoch=1)
    assert pipeline.process(agent_reply(fresh), SMTP).outcome == "answer"
    assert len(answers(engine)) == 1


def test_revoke_without_as_records_the_os_user_and_a_missing_ticket_is_not_found(
    pipeline: Pipeline, engine: sa.Engine, store_url: str, tmp_path: Path
) -> None:
    desk = make_desk(tmp_path, store_url)
    missing = desk.cli("tickets", "revoke", "1")
    assert (missing.code, missing.out, missing.err) == (1, "", "maildesk: error: no ticket #1\n")
    pipeline.process(customer_mail().as_bytes(), SMTP)
    assert desk.cli("tickets", "revoke", "1").code == 0
    with Session(engine) as session:
        events = session.exec(
            select(AuditEvent).where(AuditEvent.action == "ticket.reply_addresses_revoked")
        ).all()
    assert [(e.actor, e.ticket_id) for e in events] == [(f"cli:{getpass.getuser()}", 1)]
