"""Sending a mail kept in a file, piece by piece, to the rig's real SMTP server."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest
from rig.smtp import RecordingSMTPServer

from maildesk.outbound.transport import send_file


def mail_file(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / "out-1"
    path.write_bytes(b"From: support@desk.example\r\nTo: lea@client.example\r\n"
                     b"Subject: export\r\nMessage-ID: <f@desk.example>\r\n\r\n" + body)
    return path


def client(server: RecordingSMTPServer) -> smtplib.SMTP:
    return smtplib.SMTP(server.host, server.port, "desk.example", timeout=10)


def test_a_file_larger_than_a_piece_arrives_byte_exact_with_its_dots(
    smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAx\r\n"
    # Lines starting with a dot at the start, in the middle, across the first piece's end
    # (1 MiB) and as the very last line: each must reach the server as it was.
    body = b".starts with a dot\r\n" + line * 14_000 + b"..two\r\n" + line * 2_000 + b".\r\n"
    path = mail_file(tmp_path, body)
    assert path.stat().st_size > 2**20
    with client(smtp_server) as smtp:
        assert send_file(smtp, "bounce@desk.example", ["lea@client.example"], path) == {}
    [mail] = smtp_server.mails
    assert mail.raw == path.read_bytes()
    assert (mail.mail_from, mail.rcpt_tos) == ("bounce@desk.example", ["lea@client.example"])


def test_a_file_without_a_final_line_break_gets_one(
    smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    path = mail_file(tmp_path, b"Bonjour,\r\n.no break at the end")
    with client(smtp_server) as smtp:
        send_file(smtp, "bounce@desk.example", ["lea@client.example"], path)
    assert smtp_server.mails[0].raw == path.read_bytes() + b"\r\n"


def test_refusals_are_sendmails_own_and_the_connection_goes_on(
    smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    path = mail_file(tmp_path, b"Bonjour\r\n")
    with client(smtp_server) as smtp:
        smtp_server.fail_next(550, stage="rcpt")
        refused = send_file(smtp, "b@desk.example", ["gone@client.example", "lea@client.example"],
                            path)  # fmt: skip
        assert list(refused) == ["gone@client.example"] and refused["gone@client.example"][0] == 550
        smtp_server.fail_next(451)
        with pytest.raises(smtplib.SMTPDataError) as caught:
            send_file(smtp, "b@desk.example", ["lea@client.example"], path)
        assert caught.value.smtp_code == 451
        smtp_server.fail_next(550, stage="rcpt")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            send_file(smtp, "b@desk.example", ["gone@client.example"], path)
        # After each refusal the session was reset: the next mail goes through on it.
        assert send_file(smtp, "b@desk.example", ["lea@client.example"], path) == {}
    assert [m.rcpt_tos for m in smtp_server.mails] == [["lea@client.example"]] * 2
