"""Tests that the real-server rig (Dovecot, SMTP, PostgreSQL) works as promised."""

from __future__ import annotations

import smtplib
import threading
from email.message import EmailMessage

import pytest
import sqlalchemy as sa
from imapclient import IMAPClient
from imapclient.exceptions import LoginError
from rig.dovecot import DovecotServer, ImapAccount
from rig.smtp import RecordingSMTPServer

RAW = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: desk@example.test\r\n"
    b"Subject: Printer on fire\r\n"
    b"Message-ID: <rig-1@example.test>\r\n"
    b"\r\n"
    b"It is on fire.\r\n"
)


def make_mail(subject: str = "Hello") -> EmailMessage:
    """Build a small outgoing message."""
    msg = EmailMessage()
    msg["From"] = "desk@example.test"
    msg["To"] = "alice@example.test"
    msg["Subject"] = subject
    msg.set_content("Hi Alice.\n")
    return msg


def test_imap_login_append_fetch(imap_account: ImapAccount) -> None:
    """APPEND stores the exact bytes and FETCH returns them unchanged."""
    assert imap_account.uids() == []
    uid = imap_account.append(RAW)
    assert imap_account.uids() == [uid]
    assert imap_account.fetch_all() == [RAW]


def test_each_test_gets_a_fresh_user(
    dovecot_server: DovecotServer, imap_account: ImapAccount
) -> None:
    """Users added mid-session can log in at once, and are isolated from each other."""
    imap_account.append(RAW)
    # Several users created within the same second must all work immediately.
    others = [dovecot_server.add_user() for _ in range(3)]
    assert len({a.username for a in [imap_account, *others]}) == 4
    for other in others:
        assert other.uids() == []
    wrong = ImapAccount(imap_account.host, imap_account.port, imap_account.username, "nope")
    with pytest.raises(LoginError):
        wrong.uids()


def test_create_folder_and_move(imap_account: ImapAccount) -> None:
    """CREATE makes a folder and MOVE transfers a message into it."""
    imap_account.append(RAW)
    with imap_account.client() as imap:
        assert imap.has_capability("MOVE")
        imap.create_folder("Support/Done")
        imap.select_folder("INBOX")
        imap.move(imap.search("ALL"), "Support/Done")
    assert imap_account.wait_for_count("INBOX", 0) == []
    assert len(imap_account.wait_for_count("Support/Done", 1)) == 1
    assert imap_account.fetch_all("Support/Done") == [RAW]


def test_idle_reports_new_mail(imap_account: ImapAccount) -> None:
    """A client in IDLE is told about a message appended by another connection."""
    with imap_account.client() as imap:
        assert imap.has_capability("IDLE")
        imap.select_folder("INBOX")
        imap.idle()
        appender = threading.Thread(target=imap_account.append, args=(RAW,))
        appender.start()
        responses: list[tuple[int, bytes]] = []
        try:
            # Dovecot notices new mail about half a second later; wait for the event.
            for _ in range(10):
                responses += imap.idle_check(timeout=1)
                if (1, b"EXISTS") in responses:
                    break
        finally:
            imap.idle_done()
            appender.join()
    assert (1, b"EXISTS") in responses


def test_wait_for_count_times_out(imap_account: ImapAccount) -> None:
    """wait_for_count gives up with TimeoutError, also for a missing folder."""
    with pytest.raises(TimeoutError):
        imap_account.wait_for_count("Nowhere", 1, timeout=0.2)


def test_smtp_records_mail(smtp_server: RecordingSMTPServer) -> None:
    """An accepted mail is recorded with envelope, raw bytes and parsed message."""
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10) as client:
        client.send_message(make_mail("First"), to_addrs=["alice@example.test"])
    [mail] = smtp_server.wait_for(1)
    assert mail.mail_from == "desk@example.test"
    assert mail.rcpt_tos == ["alice@example.test"]
    assert mail.message["Subject"] == "First"
    assert b"Hi Alice." in mail.raw
    assert smtp_server.connections == 1
    smtp_server.clear()
    assert smtp_server.mails == [] and smtp_server.connections == 0


def test_smtp_wait_for_predicate(smtp_server: RecordingSMTPServer) -> None:
    """wait_for filters with a predicate and times out when nothing matches."""
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10) as client:
        for subject in ("a", "b", "c"):
            client.send_message(make_mail(subject))
    [mail] = smtp_server.wait_for(1, predicate=lambda m: m.message["Subject"] == "b")
    assert mail.message["Subject"] == "b"
    with pytest.raises(TimeoutError):
        smtp_server.wait_for(4, timeout=0.1)


def test_smtp_permanent_refusal(smtp_server: RecordingSMTPServer) -> None:
    """A 550 at end of DATA raises SMTPDataError and records nothing."""
    smtp_server.fail_next(550)
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as excinfo:
            client.send_message(make_mail())
    assert excinfo.value.smtp_code == 550
    assert smtp_server.mails == []
    assert [a.status[:3] for a in smtp_server.attempts] == ["550"]


def test_smtp_temporary_failure_then_success(smtp_server: RecordingSMTPServer) -> None:
    """A 451 applies to the next mail only; the retry is accepted."""
    smtp_server.fail_next(451, count=1)
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as excinfo:
            client.send_message(make_mail())
        assert excinfo.value.smtp_code == 451
        assert smtp_server.mails == []
        client.send_message(make_mail("Retry"))
    assert [m.message["Subject"] for m in smtp_server.wait_for(1)] == ["Retry"]


def test_smtp_refusal_at_rcpt(smtp_server: RecordingSMTPServer) -> None:
    """A RCPT-stage refusal raises SMTPRecipientsRefused until reset()."""
    smtp_server.fail_next(550, count=None, stage="rcpt")
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10) as client:
        for _ in range(2):
            with pytest.raises(smtplib.SMTPRecipientsRefused) as excinfo:
                client.send_message(make_mail())
            assert excinfo.value.recipients["alice@example.test"][0] == 550
        smtp_server.reset()
        client.send_message(make_mail("After reset"))
    assert len(smtp_server.wait_for(1)) == 1


def test_smtp_dropped_connection(smtp_server: RecordingSMTPServer) -> None:
    """Dropping the connection at DATA makes smtplib raise SMTPServerDisconnected."""
    smtp_server.drop_next()
    client = smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.send_message(make_mail())
    client.close()
    assert smtp_server.mails == []
    assert [a.status for a in smtp_server.attempts] == ["dropped"]
    # The server keeps working for the next connection.
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10) as again:
        again.send_message(make_mail())
    assert len(smtp_server.wait_for(1)) == 1
    assert smtp_server.connections == 2


def _roundtrip(url: str) -> list[tuple[int, str]]:
    """Create a table, insert a row and read it back."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE ticket (id int PRIMARY KEY, subject text)"))
            conn.execute(sa.text("INSERT INTO ticket VALUES (1, 'Printer on fire')"))
            rows = conn.execute(sa.text("SELECT id, subject FROM ticket")).all()
        return [(row.id, row.subject) for row in rows]
    finally:
        engine.dispose()


_seen_databases: list[str] = []


@pytest.mark.parametrize("attempt", [1, 2])
def test_postgres_fresh_database(postgres_url: str, attempt: int) -> None:
    """Each test gets its own empty database, so CREATE TABLE never collides."""
    assert postgres_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    assert _roundtrip(postgres_url) == [(1, "Printer on fire")]
    database = sa.make_url(postgres_url).database
    assert database is not None and database not in _seen_databases
    _seen_databases.append(database)


def test_imapclient_is_real(imap_account: ImapAccount) -> None:
    """The client() helper yields a genuine IMAPClient talking to Dovecot."""
    with imap_account.client() as imap:
        assert isinstance(imap, IMAPClient)
        assert b"Dovecot" in imap.welcome
