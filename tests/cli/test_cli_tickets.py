"""`maildesk tickets` and `maildesk quarantine`, run as processes on a desk that filed real mail."""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from e2e import CUSTOMER, RunningDesk, customer_mail, running_desk
from rig.smtp import RecordingSMTPServer
from sqlmodel import col, select
from support_fixtures import Desk

from maildesk.cli.tickets import (
    HEADER_BYTES,
    MAX_HEADER_FIELDS,
    DisplayHeaders,
    read_display_headers,
)
from maildesk.store import database, directory
from maildesk.store.files import save_raw
from maildesk.store.models import Attachment, AuditEvent, InboundMail, Message, Ticket


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
        # The MAIL column holds the id that `quarantine show` and `release` take.
        human = [line.split("  ")[0] for line in cli(desk, "quarantine", "list").stdout.split("\n")]
        assert human[:2] == ["MAIL", held_id]
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


# What the CLI shows of stored rows: written straight into the store, as the pipeline would
# have filed them, so that the rows can hold what the pipeline itself would clean or refuse.

LEA = "Léa Martin <lea.martin@client.example>"
HELD = (
    b"Return-Path: <lea.martin@client.example>\r\n"
    b"Received: from mail.client.example (mail.client.example [198.51.100.7])\r\n"
    b"\tby mx.desk.example (Postfix) with ESMTPS id 4Xk2Lq0Zz9z1\r\n"
    b"\tfor <support@desk.example>; Tue, 14 Jan 2025 09:12:44 +0100 (CET)\r\n"
    b"From: =?UTF-8?Q?L=C3=A9a_Martin?= <lea.martin@client.example>\r\n"
    b"To: support@desk.example\r\n"
    b"Subject: =?UTF-8?Q?Acc=C3=A8s_refus=C3=A9=1B[2J=E2=80=AE?=\r\n"
    b"Date: Tue, 14 Jan 2025 09:12:40 +0100\r\n"
    b"Message-ID: <5f1c2a9e-8d1b-4c3e-9a77-0c2b1e4d6f10@client.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"User-Agent: Mozilla Thunderbird\r\n"
    b"Content-Type: text/plain; charset=UTF-8; format=flowed\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Bonjour,\r\n\r\nJe n'ai pas encore de compte.\r\n\r\nL\xc3\xa9a\r\n"
)
# 1,200 nested comments: the address parser of policy.default recurses once per parenthesis.
BOMB_FROM = "Claire Dupont " + "(" * 1200 + " <claire.dupont@client.example>"
BOMB_SUBJECT = "Facture " + "(" * 600 + ")" * 600
BOMB = (
    b"Return-Path: <claire.dupont@client.example>\r\n"
    b"Received: from [203.0.113.50] (unknown [203.0.113.50])\r\n"
    b"\tby mx.desk.example (Postfix) with ESMTP id 4Xk2Mr1Ab2z3;\r\n"
    b"\tTue, 14 Jan 2025 09:14:02 +0100 (CET)\r\n"
    + f"From: {BOMB_FROM}\r\nSubject: {BOMB_SUBJECT}\r\n".encode()
    + b"To: support@desk.example\r\n"
    b"Date: Tue, 14 Jan 2025 09:14:00 +0100\r\n"
    b"Message-ID: <bomb.1736842440@client.example>\r\n"
    b"\r\n"
    b"x\r\n"
)
RECEIVED = datetime(2025, 1, 14, 8, 12, 44, tzinfo=UTC)


def _engine(desk: Desk) -> sa.Engine:
    return database.make_engine(f"sqlite:///{desk.directory / 'state' / 'maildesk.sqlite3'}")


def _hold(desk: Desk, raw: bytes, minutes: int, sender: str = "lea.martin@client.example",
          *, lose_raw: bool = False) -> int:
    """A mail quarantined for its unknown sender, received `minutes` after RECEIVED."""
    digest, path = save_raw(desk.directory / "state", raw)
    if lose_raw:
        (desk.directory / "state" / path).unlink()
    engine = _engine(desk)
    try:
        with database.session_scope(engine) as session:
            inbound = InboundMail(
                source="smtp", raw_path=path, sha256=digest, size=len(raw),
                envelope_from=sender, outcome="quarantined", reason="unknown sender",
                received_at=RECEIVED + timedelta(minutes=minutes),
            )
            session.add(inbound)
            session.flush()
            assert inbound.id is not None
            return inbound.id
    finally:
        engine.dispose()


def _spoil(desk: Desk, table: str, row_id: int, column: str) -> None:
    """Give a row a timestamp that cannot be read back, as a bad manual edit would."""
    rows = sa.table(table, sa.column("id"), sa.column(column))
    engine = _engine(desk)
    with engine.begin() as connection:
        connection.execute(rows.update().where(rows.c.id == row_id).values({column: "not a date"}))
    engine.dispose()


def _cells(out: str) -> list[list[str]]:
    """The cells of a table: its columns are two or more spaces apart."""
    return [re.split(r" {2,}", line.rstrip()) for line in out.splitlines()]


def test_a_comment_bomb_in_from_and_subject_is_listed_and_shown(desk: Desk) -> None:
    good = _hold(desk, HELD, 0)
    bomb = _hold(desk, BOMB, 2, sender="claire.dupont@client.example")
    listed = desk.cli("quarantine", "list")
    assert listed.code == 0, listed.err
    assert _cells(listed.out) == [
        ["MAIL", "RECEIVED", "SENDER", "SUBJECT", "REASON"],
        [str(good), "2025-01-14 08:12", LEA, "Accès refusé\\x1b[2J\\u202e", "unknown sender"],
        [str(bomb), "2025-01-14 08:14", "Claire Dupont " + "(" * 45 + "…",
         "Facture " + "(" * 51 + "…", "unknown sender"],
        ["2 held in quarantine, of 2 mails received; `maildesk quarantine show MAIL` shows one"],
    ]
    as_json = json.loads(desk.cli("quarantine", "list", "--json").out)
    assert [(q["id"], q["from"], q["subject"], q["unreadable"]) for q in as_json] == [
        (good, LEA, "Accès refusé\x1b[2J\u202e", {}),
        (bomb, BOMB_FROM, BOMB_SUBJECT, {}),
    ]
    shown = desk.cli("quarantine", "show", str(bomb))
    assert shown.code == 0, shown.err
    lines = shown.out.splitlines()
    assert f"mail:          {bomb}" in lines
    assert f"from:          {BOMB_FROM}" in lines
    assert f"subject:       {BOMB_SUBJECT}" in lines
    assert json.loads(desk.cli("quarantine", "show", str(bomb), "--json").out)["from"] == BOMB_FROM


def test_one_unreadable_row_hides_no_other(desk: Desk) -> None:
    good = _hold(desk, HELD, 0)
    gone = _hold(desk, HELD.replace(b"Bonjour", b"Re-bonjour"), 3, lose_raw=True)
    spoiled = _hold(desk, HELD.replace(b"Bonjour", b"Bonsoir"), 4)
    _spoil(desk, "inboundmail", spoiled, "received_at")
    bomb = _hold(desk, BOMB, 5)
    listed = desk.cli("quarantine", "list")
    assert listed.code == 0, listed.err
    assert _cells(listed.out)[1:5] == [
        [str(good), "2025-01-14 08:12", LEA, "Accès refusé\\x1b[2J\\u202e", "unknown sender"],
        [str(gone), "2025-01-14 08:15", "(unreadable: raw mail missing)",
         "(unreadable: raw mail missing)", "unknown sender"],
        [str(spoiled), "(unreadable: ValueError)"],
        [str(bomb), "2025-01-14 08:17", "Claire Dupont " + "(" * 45 + "…",
         "Facture " + "(" * 51 + "…", "unknown sender"],
    ]
    as_json = json.loads(desk.cli("quarantine", "list", "--json").out)
    assert [(q["id"], q["subject"], q["unreadable"]) for q in as_json] == [
        (good, "Accès refusé\x1b[2J\u202e", {}),
        (gone, None, {"from": "raw mail missing", "subject": "raw mail missing"}),
        (spoiled, None, {"row": "ValueError"}),
        (bomb, BOMB_SUBJECT, {}),
    ]
    shown = desk.cli("quarantine", "show", str(gone))
    assert shown.code == 0, shown.err
    assert "parse_error:   raw mail missing" in shown.out.splitlines()


COMPANY = "Client SA\x1b]0;root@desk\x07\u202e"
SUBJECT = "Export PDF\x1b[31m en erreur\x00 \u202ecod.exe"


def _file_tickets(desk: Desk) -> list[int]:
    """Three tickets of one account, each with a customer's message; returns their ids."""
    engine = _engine(desk)
    opened = datetime(2025, 1, 14, 9, 0, tzinfo=UTC)
    refs = []
    try:
        with database.session_scope(engine) as session:
            directory.add_company(session, name=COMPANY, after_hours=False, actor="test")
            account = directory.add_account(session, email=CUSTOMER, name="Claire\x00 Dupont",
                                            company=COMPANY, actor="test")
            session.flush()
            assert account.id is not None
            for n, subject in enumerate(["Connexion impossible", SUBJECT, "Question facture"]):
                ticket = Ticket(subject=subject, account_id=account.id,
                                company_id=account.company_id, created_at=opened,
                                updated_at=opened + timedelta(minutes=n))
                session.add(ticket)
                session.flush()
                assert ticket.id is not None
                message = Message(ticket_id=ticket.id, direction="in", author_kind="customer",
                                  author_email=CUSTOMER, author_name="Claire\x00 Dupont",
                                  text="Bonjour,\r\n\r\nÇa échoue.\x1b[2J\rClaire",
                                  created_at=opened)
                session.add(message)
                session.flush()
                assert message.id is not None
                if subject == SUBJECT:
                    session.add(Attachment(message_id=message.id, sha256="0" * 64,
                                           filename="facture\u202efdp.exe",
                                           content_type="application/pdf", size=48213))
                refs.append(ticket.id)
    finally:
        engine.dispose()
    return refs


def test_controls_in_stored_values_never_reach_the_terminal(desk: Desk) -> None:
    first, second, third = _file_tickets(desk)
    _hold(desk, HELD, 0)
    outputs = {}
    for command in (["tickets", "list"], ["tickets", "show", str(second)],
                    ["companies", "list"], ["accounts", "list"], ["accounts", "show", CUSTOMER],
                    ["quarantine", "list"], ["quarantine", "show", "1"]):
        result = desk.cli(*command)
        assert result.code == 0, result.err
        outputs[" ".join(command[:2])] = result.out
    for out in outputs.values():
        assert not {"\x1b", "\x00", "\x07", "\u202e", "\r"} & set(out)
    # The directory cleaned the company's name when it stored it; the rest was stored raw.
    company = "Client SA]0;root@desk"
    assert _cells(outputs["tickets list"]) == [
        ["TICKET", "STATUS", "PRIORITY", "UPDATED", "REQUESTER", "COMPANY", "ASSIGNEE",
         "SUBJECT", "MESSAGES"],
        # No agent exists on this desk, so nobody can see the tickets: they are unattended.
        [f"#{third}", "open", "normal", "2025-01-14 09:02", CUSTOMER, company, "unattended",
         "Question facture", "1"],
        [f"#{second}", "open", "normal", "2025-01-14 09:01", CUSTOMER, company, "unattended",
         "Export PDF\\x1b[31m en erreur\\x00 \\u202ecod.exe", "1"],
        [f"#{first}", "open", "normal", "2025-01-14 09:00", CUSTOMER, company, "unattended",
         "Connexion impossible", "1"],
    ]
    assert outputs["tickets show"].splitlines() == [
        f"#{second} Export PDF\\x1b[31m en erreur\\x00 \\u202ecod.exe",
        f"status: open; requester: Claire Dupont <{CUSTOMER}> ({company}); "
        "opened 2025-01-14T09:00:00+00:00",
        "priority: normal; assignee: nobody (unattended); watchers: none; followers: none",
        "",
        f"--- 2025-01-14T09:00:00+00:00 customer Claire\\x00 Dupont <{CUSTOMER}>",
        "Bonjour,", "", "Ça échoue.\\x1b[2J", "Claire",
        "[attachment: facture\\u202efdp.exe (application/pdf, 48213 bytes)]",
    ]
    assert _cells(outputs["companies list"]) == [
        ["NAME", "AFTER_HOURS", "ACTIVE"], [company, "False", "True"],
    ]
    assert _cells(outputs["accounts list"]) == [
        ["EMAIL", "NAME", "COMPANY", "LOCALE", "ACTIVE"],
        [CUSTOMER, "Claire Dupont", company, "fr", "True"],
    ]
    assert "name:           Claire Dupont" in outputs["accounts show"].splitlines()
    assert f"company:        {company}" in outputs["accounts show"].splitlines()
    assert "subject:       Accès refusé\\x1b[2J\\u202e" in outputs["quarantine show"].splitlines()
    # JSON keeps the stored values, escaped so that the terminal shows them as text.
    raw_json = desk.cli("tickets", "list", "--json").out
    assert "\\u001b[31m" in raw_json and "\\u202e" in raw_json
    assert not {"\x1b", "\x00", "\u202e"} & set(raw_json)
    assert json.loads(raw_json)[1]["subject"] == SUBJECT


def test_an_unreadable_ticket_or_message_hides_no_other(desk: Desk) -> None:
    first, second, third = _file_tickets(desk)
    _spoil(desk, "ticket", second, "updated_at")
    engine = _engine(desk)
    with database.session_scope(engine) as session:
        session.add(Message(ticket_id=first, direction="out", author_kind="agent",
                            author_email="alice.martin@vendor.example", author_name="Alice Martin",
                            text="Pouvez-vous réessayer ?",
                            created_at=datetime(2025, 1, 14, 10, 0, tzinfo=UTC)))
        session.flush()
        # The customer's message, the first of the thread, is the one spoiled.
        spoiled_id = session.exec(
            select(Message.id).where(Message.ticket_id == first).order_by(col(Message.id))
        ).first()
        assert spoiled_id is not None
    engine.dispose()
    _spoil(desk, "message", spoiled_id, "created_at")

    listed = desk.cli("tickets", "list")
    assert listed.code == 0, listed.err
    assert [row[0] for row in _cells(listed.out)] == ["TICKET", f"#{third}", f"#{second}",
                                                      f"#{first}"]
    assert _cells(listed.out)[2] == [f"#{second}", "(unreadable: ValueError)", "0"]
    as_json = json.loads(desk.cli("tickets", "list", "--json").out)
    assert [(t["ref"], t["unreadable"]) for t in as_json] == [
        (third, {}), (second, {"row": "ValueError"}), (first, {}),
    ]
    shown = desk.cli("tickets", "show", str(first))
    assert shown.code == 0, shown.err
    assert shown.out.splitlines()[4:] == [
        "--- (unreadable message: ValueError)",
        "",
        "--- 2025-01-14T10:00:00+00:00 agent Alice Martin <alice.martin@vendor.example>",
        "Pouvez-vous réessayer ?",
    ]


def _rules(count: int) -> bytes:
    """As many one-line fields as a spam filter adds, one per rule it ran."""
    return b"".join(f"X-Filter-Rule: R{n:04d}=0.1\r\n".encode() for n in range(count))


def test_headers_past_the_bounds_are_not_read(tmp_path: Path) -> None:
    tail = b"From: Zoe <zoe@client.example>\r\nSubject: Bonjour\r\n\r\nBody\r\n"
    within = tmp_path / "within.eml"
    within.write_bytes(_rules(MAX_HEADER_FIELDS - 2) + tail)
    assert read_display_headers(within) == DisplayHeaders("Zoe <zoe@client.example>", "Bonjour")
    beyond = "beyond the headers read"
    too_many = tmp_path / "too_many.eml"
    too_many.write_bytes(_rules(MAX_HEADER_FIELDS - 1) + tail)
    # From is the last field read; Subject comes one past the bound.
    assert read_display_headers(too_many) == DisplayHeaders(
        "Zoe <zoe@client.example>", None, {"subject": beyond}
    )
    too_long = tmp_path / "too_long.eml"
    too_long.write_bytes(b"X-Padding: " + b"a" * HEADER_BYTES + b"\r\n" + tail)
    assert read_display_headers(too_long) == DisplayHeaders(
        None, None, {"from": beyond, "subject": beyond}
    )
    # A mail that ends within the bound, without a body, has all its headers read.
    short = tmp_path / "short.eml"
    short.write_bytes(b"Subject: Bonjour\r\n")
    assert read_display_headers(short) == DisplayHeaders("", "Bonjour")
