"""`maildesk tickets` and `maildesk quarantine`, run as processes on a desk that filed real mail."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
from pathlib import Path

from e2e import CUSTOMER, RunningDesk, customer_mail, running_desk
from rig.smtp import RecordingSMTPServer
from sqlmodel import select

from maildesk.store import database, directory
from maildesk.store.models import AuditEvent


def cli(desk: RunningDesk, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maildesk", "--config", str(desk.config), *args],
        capture_output=True, text=True, timeout=60,
    )


def test_tickets_and_quarantine(tmp_path: Path, smtp_server: RecordingSMTPServer) -> None:
    stranger = "newcomer@client.example"
    url = f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    with running_desk(tmp_path, url, imap=None, smtp=smtp_server) as desk:
        with smtplib.SMTP("127.0.0.1", desk.listener_port) as client:
            client.send_message(customer_mail())
            client.send_message(customer_mail(sender=stranger, subject="Accès refusé",
                                              text="Je n'ai pas encore de compte."))
        desk.wait_for_inbound(2)

        listed = json.loads(cli(desk, "tickets", "list", "--json").stdout)
        assert [(t["ref"], t["status"], t["requester"], t["company"]) for t in listed] == [
            (1, "open", CUSTOMER, "Client SA")
        ]
        assert listed[0]["subject"] == "Export PDF en erreur"
        assert "L'export PDF échoue" in listed[0]["messages"][0]["text"]
        shown = cli(desk, "tickets", "show", "1")
        assert shown.returncode == 0 and "#1 Export PDF en erreur" in shown.stdout
        missing = cli(desk, "tickets", "show", "99")
        assert (missing.returncode, missing.stderr.strip()) == (1, "maildesk: error: no ticket #99")

        held = json.loads(cli(desk, "quarantine", "list", "--json").stdout)
        assert [(q["reason"], q["subject"]) for q in held] == [("unknown sender", "Accès refusé")]
        held_id = str(held[0]["id"])
        detail = json.loads(cli(desk, "quarantine", "show", held_id, "--json").stdout)
        assert "Je n'ai pas encore de compte." in detail["text"]

        still = cli(desk, "quarantine", "release", held_id)
        assert still.returncode == 1 and "still held: unknown sender" in still.stdout
        with database.session_scope(desk.engine) as session:
            directory.add_account(session, email=stranger, name="New Comer",
                                  company="Client SA", actor="test")
        released = cli(desk, "quarantine", "release", held_id)
        assert released.returncode == 0, released.stderr
        assert "ticket #2" in released.stdout
        assert json.loads(cli(desk, "quarantine", "list", "--json").stdout) == []
        with desk.session() as session:
            releases = session.exec(
                select(AuditEvent).where(AuditEvent.action == "quarantine.release")
            ).all()
        # Both attempts are on record, the one that left the mail held and the one that filed it.
        assert [r.ticket_id for r in releases] == [None, 2]
        assert all(r.actor.startswith("cli:") for r in releases)
        # The released mail's ticket is acknowledged like any other.
        smtp_server.wait_for(count=1, predicate=lambda m: m.rcpt_tos == [stranger]
                             and b"[#2]" in m.raw)
