"""Erasure, on SQLite and PostgreSQL with the rig's Dovecot: every copy of the person goes."""

from __future__ import annotations

import json

import pytest
from conftest import CLAIRE, MARC, QUARANTINE, SHARED, Scene, imap_bytes, mail, places_holding
from e2e import AGENT, COLLEAGUE, CUSTOMER, DESK
from sqlmodel import Session, select

from maildesk.privacy import imap_copies
from maildesk.privacy.erase import ErasureError, erase_account, pseudonym
from maildesk.store.files import ATTACHMENTS_DIR, content_path, sha256_hex
from maildesk.store.models import Attachment, AuditEvent, InboundMail, Message, Outbox


def test_erasure_leaves_no_byte_of_the_person_and_keeps_the_colleague(scene: Scene) -> None:
    assert places_holding(scene, CLAIRE), "the scene must hold Claire's data to begin with"
    before = len(imap_bytes(scene.imap))
    report = erase_account(scene.settings, scene.engine, CUSTOMER, actor="cli:dpo")
    assert report.counts["tickets"] == 1 and report.counts["messages"] == 3
    assert report.counts["inbound_mails"] == 5  # 3 on the ticket, 2 on none
    # Every copy was found: four by Message-ID, the one without by its hash.
    assert (report.imap_deleted, report.imap_not_found) == (5, [])
    assert len(imap_bytes(scene.imap)) == before - 5
    assert places_holding(scene, CLAIRE) == []
    # Marc's account, ticket, thread, mail and the file they both sent are all still there.
    assert COLLEAGUE in scene.accounts() and scene.tickets() == {scene.marc_ticket}
    assert len(places_holding(scene, MARC)) >= 3
    assert content_path(scene.state_dir, ATTACHMENTS_DIR, sha256_hex(SHARED)).read_bytes() == SHARED
    with Session(scene.engine) as session:
        [message] = session.exec(select(Message)).all()
        assert message.ticket_id == scene.marc_ticket
        assert [a.filename for a in session.exec(select(Attachment))] == ["commun.pdf"]
        raw = session.exec(select(InboundMail).where(InboundMail.ticket_id == scene.marc_ticket)
                           ).one()
        assert (scene.state_dir / raw.raw_path).exists()


def test_audit_events_about_the_person_keep_action_and_time_under_a_pseudonym(
    scene: Scene,
) -> None:
    with Session(scene.engine) as session:
        opened = session.exec(select(AuditEvent).where(AuditEvent.action == "ticket.open",
                                                       AuditEvent.actor == CUSTOMER)).one()
    erase_account(scene.settings, scene.engine, CUSTOMER, actor="cli:dpo")
    alias = pseudonym(scene.settings, CUSTOMER)
    with Session(scene.engine) as session:
        kept = session.get(AuditEvent, opened.id)
        assert kept is not None
        assert (kept.actor, kept.action, kept.at) == (alias, "ticket.open", opened.at)
        assert (kept.ticket_id, kept.account_id) == (None, None)
        assert json.loads(kept.detail or "{}")["about"] == alias
        # The agent's answer stays in the log as the agent's act, about the pseudonym.
        answered = session.exec(select(AuditEvent).where(AuditEvent.action == "ticket.answer")
                                ).one()
        assert answered.actor == AGENT and json.loads(answered.detail or "{}")["about"] == alias
        erased = session.exec(select(AuditEvent).where(AuditEvent.action == "privacy.erase")
                              ).one()
        assert erased.actor == "cli:dpo" and json.loads(erased.detail or "{}")["about"] == alias
        # Marc's events still name him.
        assert session.exec(select(AuditEvent).where(AuditEvent.actor == COLLEAGUE)).all()


def test_erasing_twice_changes_nothing_more(scene: Scene) -> None:
    erase_account(scene.settings, scene.engine, CUSTOMER, actor="t")
    with pytest.raises(ErasureError, match="no account"):
        erase_account(scene.settings, scene.engine, CUSTOMER, actor="t")


def test_a_dry_run_counts_and_erases_nothing(scene: Scene) -> None:
    planned = erase_account(scene.settings, scene.engine, CUSTOMER, actor="t", dry_run=True)
    assert planned.dry_run and planned.counts["tickets"] == 1
    assert CUSTOMER in scene.accounts() and len(imap_bytes(scene.imap)) == 7


def test_a_message_the_person_wrote_into_a_colleagues_ticket_goes_with_its_notification(
    scene: Scene,
) -> None:
    into_marcs = mail("Claire Dupont", CUSTOMER, f"Re: [#{scene.marc_ticket}] Import CSV",
                      "Chez moi aussi, Claire")
    assert scene.file(into_marcs, None) == scene.marc_ticket
    with Session(scene.engine) as session:
        outbox_before = len(session.exec(select(Outbox).where(
            Outbox.ticket_id == scene.marc_ticket)).all())
    erase_account(scene.settings, scene.engine, CUSTOMER, actor="t")
    with Session(scene.engine) as session:
        left = session.exec(select(Message).where(Message.ticket_id == scene.marc_ticket)).all()
        outbox_after = len(session.exec(select(Outbox).where(
            Outbox.ticket_id == scene.marc_ticket)).all())
    assert [m.author_email for m in left] == [COLLEAGUE]
    assert outbox_after == outbox_before - 1  # the agent's notice of Claire's follow-up
    assert places_holding(scene, CLAIRE) == []


def test_with_the_imap_server_down_nothing_is_erased(scene: Scene) -> None:
    imap = scene.settings.imap.model_copy(update={"port": 1})
    settings = scene.settings.model_copy(update={"imap": imap})
    with pytest.raises(ErasureError, match="IMAP"):
        erase_account(settings, scene.engine, CUSTOMER, actor="t")
    assert CUSTOMER in scene.accounts() and len(imap_bytes(scene.imap)) == 7


def test_without_a_message_id_a_crowded_folder_is_not_searched_but_reported(
    scene: Scene, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A folder "too full to hash" is one of more than FEW_MAILS mails; lower the bound rather
    # than append hundreds of mails.
    monkeypatch.setattr(imap_copies, "FEW_MAILS", 1)
    report = erase_account(scene.settings, scene.engine, CUSTOMER, actor="t")
    [line] = report.imap_not_found
    assert "no Message-ID" in line
    # The other four were found by their Message-ID all the same.
    assert report.imap_deleted == 4
    assert len([m for m in imap_bytes(scene.imap) if CUSTOMER.encode() in m]) == 1
    assert scene.imap is not None and len(scene.imap.fetch_all(QUARANTINE)) == 2


def test_a_mail_quoting_the_message_id_is_not_taken_for_the_copy(scene: Scene) -> None:
    with Session(scene.engine) as session:
        first = session.exec(select(InboundMail).where(
            InboundMail.ticket_id == scene.claire_ticket).order_by(InboundMail.id)).first()
        assert first is not None and first.message_id
    # Marc's mail refers to Claire's by its Message-ID: the search finds it, the hash refuses it.
    assert scene.imap is not None
    scene.imap.append(mail("Marc Petit", COLLEAGUE, "Re: Export", "Vu.", to=DESK,
                           References=first.message_id), "maildesk/processed")
    erase_account(scene.settings, scene.engine, CUSTOMER, actor="t")
    assert [m for m in imap_bytes(scene.imap) if first.message_id.encode() in m]
