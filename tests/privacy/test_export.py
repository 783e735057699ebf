"""The export of one account: all of theirs, nothing of another account."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from conftest import MARC, SHARED, Scene
from e2e import AGENT, CUSTOMER, US_AGENT
from sqlmodel import Session, select

from maildesk.privacy.export import ExportError, write_export
from maildesk.store import database, directory
from maildesk.store.access_log import record_delivery, record_read
from maildesk.store.models import AuditEvent


def test_the_export_holds_tickets_attachments_mails_and_audit_and_nothing_of_marc(
    scene: Scene, tmp_path: Path,
) -> None:
    with database.session_scope(scene.engine) as session:
        us_agent = directory.find_agent(session, US_AGENT)
        assert us_agent is not None
        record_delivery(session, agent=us_agent, ticket_id=scene.claire_ticket, kind="followup")
        record_read(session, actor="cli:operator", ticket_id=scene.claire_ticket, what="ticket")
    target = tmp_path / "claire.zip"
    write_export(scene.settings, scene.engine, CUSTOMER, target, actor="cli:dpo")
    with zipfile.ZipFile(target) as archive:
        names = set(archive.namelist())
        data = json.loads(archive.read("data.json"))
        contents = b"".join(archive.read(n) for n in names)
    assert data["account"]["email"] == CUSTOMER and data["company"] == "Client SA"
    assert data["source"]["from"] == "your company"
    assert data["retention"]["years_after_deactivation"] == 5
    [ticket] = data["tickets"]
    assert [m["from"] for m in ticket["messages"]] == ["you", "agent", "you"]
    assert "voici la correction" in ticket["messages"][1]["text"]
    files = {a["filename"]: a["file"] for a in ticket["messages"][0]["attachments"]}
    assert set(files) == {"facture-claire.pdf", "commun.pdf"}
    assert archive_bytes(target, files["commun.pdf"]) == SHARED
    # Her original mails: the two on the ticket she wrote, and the two on no ticket.
    mails = {n for n in names if n.startswith("mails/")}
    assert len(mails) == 4 and set(data["mails_on_no_ticket"]) <= mails
    assert all(archive_bytes(target, n).startswith(b"From: Claire Dupont") for n in mails)
    # Who received her data: the EU agent by mail, and a US access in the log.
    assert {r["email"] for r in data["recipients"]} == {AGENT}
    access = {(e["actor"], e["action"]) for e in data["access_log"]}
    assert {(US_AGENT, "access.delivery"), ("cli:operator", "access.read"),
            (CUSTOMER, "ticket.open")} <= access
    assert [e["region"] for e in data["access_log"] if e["actor"] == US_AGENT] == ["us"]
    assert data["files"] == sorted(n for n in names if n != "data.json")
    for needle in MARC:
        assert needle not in contents
    assert target.stat().st_mode & 0o077 == 0
    with Session(scene.engine) as session:
        event = session.exec(select(AuditEvent).where(AuditEvent.action == "privacy.export")
                             ).one()
    assert event.actor == "cli:dpo" and event.detail is not None and "Claire" not in event.detail


def archive_bytes(path: Path, name: str) -> bytes:
    """One member of the zip."""
    with zipfile.ZipFile(path) as archive:
        return archive.read(name)


def test_an_unknown_address_or_a_missing_folder_is_one_clear_error(
    scene: Scene, tmp_path: Path,
) -> None:
    with pytest.raises(ExportError, match="no account"):
        write_export(scene.settings, scene.engine, "nobody@x.example", tmp_path / "a.zip",
                     actor="t")
    with pytest.raises(ExportError, match="cannot write"):
        write_export(scene.settings, scene.engine, CUSTOMER, tmp_path / "no" / "a.zip",
                     actor="t")
    assert list(tmp_path.glob("*.zip")) == []
