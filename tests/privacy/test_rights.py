"""Restriction, objection and post-mortem directives, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import zipfile
from email import message_from_bytes, policy

import pytest
import sqlalchemy as sa
from e2e import COLLEAGUE, CUSTOMER, customer_mail
from outgoing import composed
from sqlmodel import Session, col, select
from support_fixtures import Desk

from maildesk.mail.message import Delivery
from maildesk.pipeline import Pipeline
from maildesk.privacy import notice, rights
from maildesk.store import database, directory
from maildesk.store.directory import DirectoryError
from maildesk.store.models import Account, AuditEvent, Message, Outbox, RightsRequest, Ticket

SMTP = Delivery(source="smtp", envelope_from=CUSTOMER)
HEIR = "heir@family.example"
DPO = "dpo@neocasesoftware.com"


def _actions(engine: sa.Engine, account_id: int | None = None) -> list[str]:
    with Session(engine) as session:
        query = select(AuditEvent.action).order_by(col(AuditEvent.id))
        if account_id is not None:
            query = query.where(AuditEvent.account_id == account_id)
        return list(session.exec(query))


def _account(engine: sa.Engine, email: str = CUSTOMER) -> Account | None:
    with Session(engine) as session:
        return session.exec(select(Account).where(Account.email == email)).first()


def _outbox(engine: sa.Engine, kind: str) -> list[Outbox]:
    with Session(engine) as session:
        return list(session.exec(select(Outbox).where(Outbox.kind == kind)))


def test_restriction_is_recorded_lifted_and_audited(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    with database.session_scope(engine) as session:
        account = rights.restrict(session, email=CUSTOMER.upper(), actor="cli:dpo")
        assert rights.is_restricted(account)
        with pytest.raises(DirectoryError, match="already restricted"):
            rights.restrict(session, email=CUSTOMER, actor="cli:dpo")
    stored = _account(engine)
    assert stored is not None and rights.is_restricted(stored)
    other = _account(engine, COLLEAGUE)
    assert other is not None and not rights.is_restricted(other)
    with database.session_scope(engine) as session:
        assert not rights.is_restricted(rights.unrestrict(session, email=CUSTOMER,
                                                          actor="cli:dpo"))
        with pytest.raises(DirectoryError, match="is not restricted"):
            rights.unrestrict(session, email=CUSTOMER, actor="cli:dpo")
    assert _actions(engine, stored.id)[-2:] == ["privacy.restrict", "privacy.unrestrict"]


def test_an_objection_opens_a_ticket_for_the_dpo(pipeline: Pipeline, engine: sa.Engine) -> None:
    settings = pipeline.settings
    with database.session_scope(engine) as session:
        objection = rights.record_objection(session, notice.unsigned_notifier(settings),
                                            email=CUSTOMER, actor="cli:dpo")
        ticket_id, request_id = objection.ticket.id, objection.request.id
    account = _account(engine)
    assert account is not None and account.objected_at is not None
    with Session(engine) as session:
        ticket = session.get(Ticket, ticket_id)
        assert ticket is not None and ticket.account_id == account.id
        assert "article 21" in ticket.subject
        [message] = session.exec(select(Message).where(Message.ticket_id == ticket_id)).all()
        assert message.author_kind == "maildesk" and "cli:dpo" in message.text
        request = session.get(RightsRequest, request_id)
        assert request is not None and request.kind == "objection"
    # Only the DPO hears of it: no agent is notified of this ticket.
    [mail] = [o for o in session_rows(engine) if o.ticket_id == ticket_id]
    assert mail.kind == "dpo_objection" and json.loads(mail.recipients) == [DPO]
    parsed = message_from_bytes(composed(mail), policy=policy.default)
    assert f"[#{ticket_id}]" in parsed["Subject"] and "Claire Dupont" in parsed["Subject"]
    assert parsed["Reply-To"] is None
    assert "privacy.object" in _actions(engine, account.id)


def session_rows(engine: sa.Engine) -> list[Outbox]:
    with Session(engine) as session:
        return list(session.exec(select(Outbox)))


def test_a_directive_is_checked_and_recorded_without_the_heirs_address_in_the_audit(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    with database.session_scope(engine) as session:
        with pytest.raises(DirectoryError, match="export-to needs the address"):
            rights.set_directive(session, email=CUSTOMER, directive="export-to", address=None,
                                 actor="t")
        with pytest.raises(DirectoryError, match="keep takes no address"):
            rights.set_directive(session, email=CUSTOMER, directive="keep", address=HEIR,
                                 actor="t")
        with pytest.raises(DirectoryError, match="is not a valid email"):
            rights.set_directive(session, email=CUSTOMER, directive="export-to",
                                 address="heir", actor="t")
        rights.set_directive(session, email=CUSTOMER, directive="export-to",
                             address=HEIR.upper(), actor="t")
    account = _account(engine)
    assert account is not None
    assert (account.directive, account.directive_address) == ("export-to", HEIR)
    with Session(engine) as session:
        details = session.exec(select(AuditEvent.detail).where(
            AuditEvent.action == "privacy.directive")).all()
    assert details == ['{"directive": "export-to"}']


def test_deceased_with_keep_deactivates_the_account(pipeline: Pipeline, engine: sa.Engine) -> None:
    outcome = rights.carry_out_directive(pipeline.settings, engine, pipeline.notifier,
                                         email=CUSTOMER, actor="cli:dpo")
    assert outcome.directive == "keep" and outcome.export_path is None
    account = _account(engine)
    assert account is not None and account.deceased_at is not None
    assert account.deactivated_at == account.deceased_at
    assert not directory.account_is_active(account)
    assert "privacy.deceased" in _actions(engine, account.id)
    # Their next mail opens nothing.
    assert pipeline.process(customer_mail().as_bytes(), SMTP).reason == "account deactivated"


def test_deceased_with_export_to_has_the_dpo_hand_the_export_over(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    ticket_id = pipeline.process(customer_mail().as_bytes(), SMTP).ticket_id
    with database.session_scope(engine) as session:
        rights.set_directive(session, email=CUSTOMER, directive="export-to", address=HEIR,
                             actor="t")
    outcome = rights.carry_out_directive(pipeline.settings, engine, pipeline.notifier,
                                         email=CUSTOMER, actor="cli:dpo")
    path = outcome.export_path
    assert path is not None and path.parent == pipeline.settings.desk.state_dir / "exports"
    with zipfile.ZipFile(path) as archive:
        data = json.loads(archive.read("data.json"))
    assert data["account"]["email"] == CUSTOMER
    assert [t["ref"] for t in data["tickets"]] == [ticket_id]
    # The heir gets word, not the data: nobody has checked who reads that mailbox.
    [told] = _outbox(engine, "directive_export")
    assert json.loads(told.recipients) == [HEIR]
    heir_mail = message_from_bytes(composed(told), policy=policy.default)
    assert list(heir_mail.iter_attachments()) == []  # type: ignore[attr-defined]
    assert "export PDF" not in composed(told).decode("ascii").lower()
    assert DPO in heir_mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    [dpo] = _outbox(engine, "dpo_directive_export")
    assert json.loads(dpo.recipients) == [DPO]
    dpo_text = message_from_bytes(composed(dpo), policy=policy.default).get_body(("plain",))
    assert str(path) in dpo_text.get_content()  # type: ignore[union-attr]
    account = _account(engine)
    assert account is not None and account.deceased_at is not None
    assert not directory.account_is_active(account)


def test_deceased_with_erase_erases_the_account(pipeline: Pipeline, engine: sa.Engine) -> None:
    pipeline.process(customer_mail().as_bytes(), SMTP)
    with database.session_scope(engine) as session:
        rights.set_directive(session, email=CUSTOMER, directive="erase", address=None,
                             actor="t")
    outcome = rights.carry_out_directive(pipeline.settings, engine, pipeline.notifier,
                                         email=CUSTOMER, actor="cli:dpo")
    assert outcome.erased
    assert _account(engine) is None
    assert _account(engine, COLLEAGUE) is not None
    with Session(engine) as session:
        assert session.exec(select(Ticket)).all() == []


def test_the_rights_commands(desk: Desk) -> None:
    assert desk.cli("companies", "add", "Client SA").code == 0
    assert desk.cli("accounts", "add", "--email", CUSTOMER, "--name", "Claire",
                    "--company", "Client SA").code == 0
    restricted = desk.cli("privacy", "restrict", CUSTOMER)
    assert restricted.code == 0 and "restricted" in restricted.out
    again = desk.cli("privacy", "restrict", CUSTOMER)
    assert again.code == 1 and again.err.startswith("maildesk: error: the account")
    assert desk.cli("privacy", "unrestrict", CUSTOMER).code == 0
    objected = desk.cli("privacy", "object", CUSTOMER)
    assert objected.code == 0 and "ticket #1 opened for the DPO" in objected.out
    assert desk.cli("privacy", "directive", CUSTOMER, "--set", "export-to", HEIR).code == 0
    shown = desk.cli("privacy", "directive", CUSTOMER)
    assert shown.out.strip() == f"directive of {CUSTOMER}: export-to {HEIR}"
    missing = desk.cli("privacy", "directive", CUSTOMER, "--set", "export-to")
    assert missing.code == 1 and "needs the address" in missing.err
    later = desk.cli("privacy", "directive", CUSTOMER, "--set", "later")
    assert later.code == 2 and "expected keep, erase or export-to" in later.err
    extra = desk.cli("privacy", "directive", CUSTOMER, "--set", "keep", HEIR)
    assert extra.code == 2 and "unexpected" in extra.err
    assert desk.cli("privacy", "directive", CUSTOMER, "--set", "erase").code == 0
    refused = desk.cli("privacy", "deceased", CUSTOMER)
    assert refused.code == 1 and "give --yes" in refused.err
    unknown = desk.cli("privacy", "deceased", "nobody@client.example")
    assert (unknown.code, unknown.err.strip()) == (
        1, "maildesk: error: no account with email nobody@client.example")
    erased = desk.cli("privacy", "deceased", CUSTOMER, "--yes")
    assert erased.code == 0 and "was erased" in erased.out
    assert desk.cli("accounts", "show", CUSTOMER).code == 1
