"""The send stage against the rig's real SMTP server and real SQLite and PostgreSQL stores."""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import threading
import time
import uuid
from datetime import timedelta
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from rig.dovecot import free_port
from rig.smtp import RecordingSMTPServer

from maildesk.config import DeskSettings, Settings, SmtpSettings
from maildesk.outbound import send, transport
from maildesk.outbound.compose import Draft, DraftFile
from maildesk.outbound.send import OutboxSender, SendReport
from maildesk.store import database
from maildesk.store.database import session_scope
from maildesk.store.files import ATTACHMENTS_DIR, SPOOL_DIR, content_path, sha256_hex
from maildesk.store.models import Outbox, utcnow

ZERO = timedelta(0)


def make_settings(
    tmp_path: Path, smtp: RecordingSMTPServer | None = None, **smtp_keys: Any
) -> Settings:
    """Settings whose SMTP transport points at the rig server (or whatever `smtp_keys` say)."""
    if smtp is not None:
        smtp_keys = {"transport": "smtp", "host": smtp.host, "port": smtp.port, **smtp_keys}
    return Settings(
        desk=DeskSettings(state_dir=tmp_path / "state", address="support@desk.example"),
        smtp=SmtpSettings(**smtp_keys),
    )


def add_mail(engine: sa.Engine, n: int, recipients: list[str] | None = None, **row: Any) -> Outbox:
    """Insert one outbox row holding a rendered mail; returns the row."""
    recipients = recipients or [f"customer{n}@example.com"]
    message_id = f"<{n}.{uuid.uuid4().hex}@desk.example>"
    msg = EmailMessage()
    msg["From"] = "Support <support@desk.example>"
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = f"Mail {n} – réponse"
    msg["Message-ID"] = message_id
    # A line that starts with a dot checks that dot-stuffing is applied and undone.
    msg.set_content(f"Bonjour,\n.\n.. two dots\nMail number {n}, déjà vu.\n")
    outbox = Outbox(
        kind="reply",
        message_id=message_id,
        mail_from="support@desk.example",
        recipients=json.dumps(recipients),
        raw=msg.as_bytes(policy=policy.SMTP),
        **row,
    )
    with session_scope(engine) as session:
        session.add(outbox)
    return outbox


def reload(engine: sa.Engine, row: Outbox) -> Outbox:
    """The row as the database has it now."""
    with session_scope(engine) as session:
        fresh = session.get(Outbox, row.id)
        assert fresh is not None
        return fresh


def make_due(engine: sa.Engine, row: Outbox) -> None:
    """Move a row's next attempt into the past."""
    with session_scope(engine) as session:
        fresh = session.get(Outbox, row.id)
        assert fresh is not None
        fresh.next_attempt_at = utcnow() - timedelta(seconds=1)


def test_batch_sends_byte_exact_over_one_connection(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    """Three due rows leave byte for byte, with their envelopes, over one connection."""
    rows = [add_mail(engine, n) for n in range(3)]
    rows[2] = add_mail(engine, 2, recipients=["a@example.com", "b@example.org"])
    sender = OutboxSender(make_settings(tmp_path, smtp_server), engine)
    assert sender.send_batch() == SendReport(sent=4)
    assert smtp_server.connections == 1
    recorded = {mail.message["Message-ID"]: mail for mail in smtp_server.mails}
    assert len(recorded) == 4
    for row in rows:
        mail = recorded[row.message_id]
        assert mail.raw == row.raw
        assert mail.mail_from == row.mail_from
        assert mail.rcpt_tos == json.loads(row.recipients)
        fresh = reload(engine, row)
        assert fresh.status == "sent" and fresh.sent_at is not None
        assert fresh.attempts == 1 and fresh.last_error is None
    assert sender.send_batch() == SendReport()


def test_temporary_failure_is_retried_later(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    """A 451 leaves the row pending with a backoff; the others still go; a later batch sends it."""
    first, *others = [add_mail(engine, n) for n in range(3)]
    smtp_server.fail_next(451)
    sender = OutboxSender(make_settings(tmp_path, smtp_server), engine)
    assert sender.send_batch() == SendReport(sent=2, retried=1)
    fresh = reload(engine, first)
    assert fresh.status == "pending" and fresh.attempts == 1 and fresh.sent_at is None
    assert fresh.last_error is not None and "451" in fresh.last_error
    assert fresh.next_attempt_at > utcnow()
    assert all(reload(engine, row).status == "sent" for row in others)
    assert sender.send_batch() == SendReport()  # Not due yet.

    make_due(engine, first)
    assert sender.send_batch() == SendReport(sent=1)
    fresh = reload(engine, first)
    assert fresh.status == "sent" and fresh.attempts == 2
    assert [m.message["Message-ID"] for m in smtp_server.mails].count(first.message_id) == 1


def test_permanent_failure_is_not_retried(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    """A 550 fails the row at once, and no later batch tries it again."""
    row = add_mail(engine, 1)
    smtp_server.fail_next(550)
    sender = OutboxSender(make_settings(tmp_path, smtp_server), engine, retry_base=ZERO)
    assert sender.send_batch() == SendReport(failed=1)
    fresh = reload(engine, row)
    assert fresh.status == "failed" and fresh.last_error is not None
    assert fresh.last_error.startswith("550")
    assert sender.send_batch() == SendReport()
    assert len(smtp_server.attempts) == 1


def test_temporary_failures_use_up_nothing_until_the_deadline(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    """A relay that answers 452 for days: retried with growing gaps, given up only at the
    deadline, never by a count of tries."""
    row = add_mail(engine, 1)
    queued = reload(engine, row).created_at
    smtp_server.fail_next(452, count=None)
    clock = {"now": queued}
    sender = OutboxSender(
        make_settings(tmp_path, smtp_server), engine, give_up_after=timedelta(days=5),
        clock=lambda: clock["now"],
    )
    gaps = []
    for _ in range(300):
        assert sender.send_batch() == SendReport(retried=1)
        fresh = reload(engine, row)
        assert fresh.status == "pending"
        gaps.append(fresh.next_attempt_at - clock["now"])
        clock["now"] = fresh.next_attempt_at
        if clock["now"] >= queued + timedelta(days=5):
            break
    # 1 minute doubling (less up to 20% of jitter), capped at an hour, and the last retry at
    # the deadline itself.
    assert timedelta(seconds=48) <= gaps[0] <= timedelta(minutes=1)
    assert timedelta(minutes=1, seconds=36) <= gaps[1] <= timedelta(minutes=2)
    assert max(gaps) <= timedelta(hours=1) and max(gaps) >= timedelta(minutes=48)
    assert clock["now"] == queued + timedelta(days=5)
    assert sender.send_batch() == SendReport(failed=1)
    fresh = reload(engine, row)
    assert fresh.status == "failed"
    assert fresh.last_error is not None and fresh.last_error.startswith("gave up after 5 days: 452")
    assert fresh.deferrals == len(gaps)


def test_a_5xx_is_final_at_once(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    """A 550 fails the mail on its first try: no retry."""
    row = add_mail(engine, 1)
    smtp_server.fail_next(550, count=None)
    sender = OutboxSender(make_settings(tmp_path, smtp_server), engine)
    assert sender.send_batch() == SendReport(failed=1)
    fresh = reload(engine, row)
    assert (fresh.status, fresh.deferrals) == ("failed", 0)
    assert fresh.last_error is not None and fresh.last_error.startswith("550")


def test_a_kept_connection_serves_the_next_batches_and_a_dead_one_is_replaced(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    """The daemon's sender keeps its connection between batches, checked by a NOOP; after the
    relay restarts, the next batch connects anew and loses nothing."""
    sender = OutboxSender(make_settings(tmp_path, smtp_server), engine, keep_connection=True)
    try:
        for n in range(3):
            add_mail(engine, n)
            assert sender.send_batch() == SendReport(sent=1)
        assert smtp_server.connections == 1
        smtp_server.stop()
        smtp_server.start(smtp_server.port)
        add_mail(engine, 3)
        assert sender.send_batch() == SendReport(sent=1)
        assert smtp_server.connections == 1  # Counted since the restart: the new connection.
        assert len({m.message["Message-ID"] for m in smtp_server.mails}) == 4
    finally:
        sender.close()


def test_without_keep_connection_each_batch_has_its_own(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    sender = OutboxSender(make_settings(tmp_path, smtp_server), engine)
    for n in range(2):
        add_mail(engine, n)
        assert sender.send_batch() == SendReport(sent=1)
    assert smtp_server.connections == 2


def test_dropped_connection_reconnects_for_the_next_rows(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    """A connection dropped at DATA defers that row; the rest go over a new connection."""
    first, *others = [add_mail(engine, n) for n in range(3)]
    smtp_server.drop_next()
    sender = OutboxSender(make_settings(tmp_path, smtp_server), engine)
    assert sender.send_batch() == SendReport(sent=2, retried=1)
    fresh = reload(engine, first)
    assert fresh.status == "pending" and fresh.attempts == 1
    assert fresh.last_error is not None and "connection lost" in fresh.last_error
    assert {m.message["Message-ID"] for m in smtp_server.mails} == {r.message_id for r in others}
    assert smtp_server.connections == 2


def test_some_recipients_refused(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    """A recipient refused at RCPT is noted; the mail counts as sent to the others."""
    row = add_mail(engine, 1, recipients=["gone@example.com", "here@example.com"])
    smtp_server.fail_next(550, stage="rcpt")
    sender = OutboxSender(make_settings(tmp_path, smtp_server), engine)
    assert sender.send_batch() == SendReport(sent=1)
    [mail] = smtp_server.mails
    assert mail.rcpt_tos == ["here@example.com"]
    fresh = reload(engine, row)
    assert fresh.status == "sent"
    assert fresh.last_error is not None and "gone@example.com (550" in fresh.last_error


def test_unreachable_server_defers_one_row_per_batch(engine: sa.Engine, tmp_path: Path) -> None:
    """With nothing listening, one row is deferred and the rest wait for a later batch."""
    rows = [add_mail(engine, n) for n in range(2)]
    due_at = reload(engine, rows[1]).next_attempt_at
    settings = make_settings(tmp_path, transport="smtp", host="127.0.0.1", port=free_port())
    sender = OutboxSender(settings, engine)
    assert sender.send_batch() == SendReport(retried=1)
    first, second = (reload(engine, row) for row in rows)
    assert first.status == "pending" and first.attempts == 1
    assert first.last_error is not None and first.last_error.startswith("connect to")
    # Claimed with the first but never tried: given back as it was.
    assert second.status == "pending" and second.attempts == 0 and second.last_error is None
    assert second.next_attempt_at == due_at


def test_maildir_transport(engine: sa.Engine, tmp_path: Path) -> None:
    """The maildir transport writes one file per row into new/, byte for byte."""
    rows = [add_mail(engine, n) for n in range(3)]
    maildir = tmp_path / "out"
    sender = OutboxSender(make_settings(tmp_path, transport="maildir", maildir=maildir), engine)
    assert sender.send_batch() == SendReport(sent=3)
    files = sorted((maildir / "new").iterdir())
    assert sorted(f.read_bytes() for f in files) == sorted(row.raw for row in rows)
    assert list((maildir / "tmp").iterdir()) == []
    assert all(reload(engine, row).status == "sent" for row in rows)


def test_lease(engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path) -> None:
    """A row left "sending" is sent again once its lease ran out, and not before."""
    expired = add_mail(engine, 1, status="sending", attempts=1,
                       next_attempt_at=utcnow() - timedelta(seconds=1))  # fmt: skip
    leased = add_mail(engine, 2, status="sending", attempts=1,
                      next_attempt_at=utcnow() + timedelta(minutes=10))  # fmt: skip
    sender = OutboxSender(make_settings(tmp_path, smtp_server), engine)
    assert sender.send_batch() == SendReport(sent=1)
    assert [m.message["Message-ID"] for m in smtp_server.mails] == [expired.message_id]
    fresh = reload(engine, expired)
    assert fresh.status == "sent" and fresh.attempts == 2
    assert reload(engine, leased).status == "sending"


def test_claims_lock_rows_on_postgresql_only(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    """The claim uses FOR UPDATE SKIP LOCKED on PostgreSQL; SQLite has no such clause."""
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    add_mail(engine, 1)
    OutboxSender(make_settings(tmp_path, smtp_server), engine).send_batch()
    locking = [s for s in statements if "FOR UPDATE" in s]
    if engine.dialect.name == "postgresql":
        assert locking and all("SKIP LOCKED" in s for s in locking)
    else:
        assert locking == []


def test_concurrent_senders_send_each_row_once(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    """Two senders (two engines, as two instances would have) share the rows without overlap."""
    rows = [add_mail(engine, n) for n in range(30)]
    other = database.make_engine(engine.url.render_as_string(hide_password=False))
    settings = make_settings(tmp_path, smtp_server)
    # Small claims, so that the two senders take turns rather than one claiming everything.
    senders = [OutboxSender(settings, engine, claim_size=4),
               OutboxSender(settings, other, claim_size=4)]  # fmt: skip
    barrier = threading.Barrier(2)
    reports: list[SendReport] = []

    def work(sender: OutboxSender) -> None:
        barrier.wait()
        reports.append(sender.send_batch())

    threads = [threading.Thread(target=work, args=(s,)) for s in senders]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        other.dispose()
    assert sum(r.sent for r in reports) == 30 and len(reports) == 2
    sent_ids = sorted(m.message["Message-ID"] for m in smtp_server.mails)
    assert sent_ids == sorted(row.message_id for row in rows)
    assert all(reload(engine, row).attempts == 1 for row in rows)


def test_rows_claimed_between_select_and_update_are_left_alone(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    """A second sender that claims while the first is between its SELECT and UPDATE.

    On SQLite the first sender's SELECT takes no lock, so both pick the same rows and only the
    compare-and-set in the UPDATE keeps them apart; on PostgreSQL the second skips the rows that
    the first has locked.
    """
    rows = [add_mail(engine, n) for n in range(30)]
    other = database.make_engine(engine.url.render_as_string(hide_password=False))
    settings = make_settings(tmp_path, smtp_server)
    first = OutboxSender(settings, engine, claim_size=10)
    second = OutboxSender(settings, other, claim_size=5)
    reports: list[SendReport] = []

    def cut_in(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("UPDATE outbox SET status") and not reports:
            reports.append(second.send_batch(limit=5))

    sa.event.listen(engine, "before_cursor_execute", cut_in)
    try:
        reports.append(first.send_batch())
    finally:
        sa.event.remove(engine, "before_cursor_execute", cut_in)
        other.dispose()
    assert reports == [SendReport(sent=5), SendReport(sent=25)]
    sent_ids = sorted(m.message["Message-ID"] for m in smtp_server.mails)
    assert sent_ids == sorted(row.message_id for row in rows)
    assert all(reload(engine, row).attempts == 1 for row in rows)


def test_batch_takes_few_write_transactions(
    engine: sa.Engine,
    smtp_server: RecordingSMTPServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Claiming and recording 30 rows commits once for the claim and once per group of 20."""
    # Grouping by rows only, so that a slow machine does not add groups by time.
    monkeypatch.setattr(send, "RECORD_SECONDS", 3600.0)
    rows = [add_mail(engine, n) for n in range(30)]
    commits: list[object] = []
    count = commits.append  # One bound method, for sa.event.remove to find.
    sa.event.listen(engine, "commit", count)
    try:
        sender = OutboxSender(make_settings(tmp_path, smtp_server), engine)
        assert sender.send_batch() == SendReport(sent=30)
    finally:
        sa.event.remove(engine, "commit", count)
    # One row at a time took two write transactions per row: 60.
    assert len(commits) <= 3
    assert all(reload(engine, row).status == "sent" for row in rows)
    assert smtp_server.connections == 1


def test_outcomes_are_recorded_by_time_as_well(
    engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a zero grouping time each outcome is committed as soon as it is known."""
    monkeypatch.setattr(send, "RECORD_SECONDS", 0.0)
    for n in range(3):
        add_mail(engine, n)
    commits: list[object] = []
    count = commits.append  # One bound method, for sa.event.remove to find.
    sa.event.listen(engine, "commit", count)
    try:
        sender = OutboxSender(make_settings(tmp_path, transport="maildir"), engine)
        assert sender.send_batch() == SendReport(sent=3)
    finally:
        sa.event.remove(engine, "commit", count)
    assert len(commits) == 1 + 3


def test_error_mid_batch_keeps_what_is_known(
    engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug on the third row: the first two are recorded, the third keeps its lease, the rest
    are given back untried."""
    rows = [add_mail(engine, n) for n in range(5)]
    real_send = transport.MaildirTransport.send
    calls: list[bytes] = []

    def flaky(self: Any, mail_from: str, recipients: list[str], raw: bytes) -> dict[str, Any]:
        calls.append(raw)
        if len(calls) == 3:
            raise RuntimeError("a bug")
        return real_send(self, mail_from, recipients, raw)

    monkeypatch.setattr(transport.MaildirTransport, "send", flaky)
    sender = OutboxSender(make_settings(tmp_path, transport="maildir"), engine)
    with pytest.raises(RuntimeError):
        sender.send_batch()
    states = [reload(engine, row) for row in rows]
    expected = [("sent", 1), ("sent", 1), ("sending", 1), ("pending", 0), ("pending", 0)]
    assert [(r.status, r.attempts) for r in states] == expected
    assert states[2].lease_until is not None
    assert states[2].lease_until > utcnow() + timedelta(seconds=20)


def test_claim_stops_at_half_its_lease(
    engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows not started before half the lease has passed are given back, not sent late."""
    rows = [add_mail(engine, n) for n in range(3)]
    real_send = transport.MaildirTransport.send

    def slow(self: Any, mail_from: str, recipients: list[str], raw: bytes) -> dict[str, Any]:
        time.sleep(0.3)
        return real_send(self, mail_from, recipients, raw)

    monkeypatch.setattr(transport.MaildirTransport, "send", slow)
    settings = make_settings(tmp_path, transport="maildir")
    sender = OutboxSender(settings, engine, lease=timedelta(seconds=0.4))
    assert sender.send_batch() == SendReport(sent=1)
    states = [(r.status, r.attempts) for r in (reload(engine, row) for row in rows)]
    assert states == [("sent", 1), ("pending", 0), ("pending", 0)]
    assert len(list((settings.outgoing_maildir / "new").iterdir())) == 1


@pytest.mark.parametrize(("tls", "built"), [("none", 0), ("starttls", 1)])
def test_tls_context_built_only_for_tls_and_once(
    engine: sa.Engine,
    smtp_server: RecordingSMTPServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tls: str,
    built: int,
) -> None:
    """No SSL context without TLS; with TLS, one context serves every connection."""
    contexts: list[ssl.SSLContext] = []
    real_context = ssl.create_default_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        contexts.append(real_context(*args, **kwargs))
        return contexts[-1]

    monkeypatch.setattr(ssl, "create_default_context", counted)
    sender = OutboxSender(make_settings(tmp_path, smtp_server, tls=tls), engine,
                          retry_base=ZERO)  # fmt: skip
    for n in range(2):
        add_mail(engine, n)
        # The rig offers no STARTTLS, so with "starttls" each batch fails after connecting.
        report = sender.send_batch()
        assert report == (SendReport(sent=1) if tls == "none" else SendReport(retried=1))
    assert smtp_server.connections == 2
    assert len(contexts) == built


async def test_run_wakes_and_stops(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    """run() sends a row as soon as `wake` is set, and returns once `stop` is set."""
    # A poll far longer than the wait below proves that the wake, not the poll, sent it.
    sender = OutboxSender(make_settings(tmp_path, smtp_server), engine, poll_seconds=3600)
    stop, wake = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(sender.run(stop, wake))
    for n in range(2):
        row = await asyncio.to_thread(add_mail, engine, n)
        wake.set()
        mails = await asyncio.to_thread(smtp_server.wait_for, n + 1)
        assert mails[n].message["Message-ID"] == row.message_id
    stop.set()
    await asyncio.wait_for(task, timeout=30)
    assert reload(engine, row).status == "sent"


async def test_run_without_wake_stops(engine: sa.Engine, tmp_path: Path) -> None:
    """run() with no wake event and nothing to send still returns when stopped."""
    settings = make_settings(tmp_path, transport="maildir")
    sender = OutboxSender(settings, engine, poll_seconds=3600)
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    await asyncio.sleep(0)
    stop.set()
    await asyncio.wait_for(task, timeout=30)


@pytest.mark.parametrize("recipients", ["not json", '{"a": 1}'])
def test_bad_recipients_fail(engine: sa.Engine, tmp_path: Path, recipients: str) -> None:
    """A row whose recipients are not a list of addresses fails instead of looping."""
    row = add_mail(engine, 1)
    with session_scope(engine) as session:
        fresh = session.get(Outbox, row.id)
        assert fresh is not None
        fresh.recipients = recipients
    sender = OutboxSender(make_settings(tmp_path, transport="maildir"), engine)
    assert sender.send_batch() == SendReport(failed=1)
    assert reload(engine, row).status == "failed"


def queue_large_draft(engine: sa.Engine, state_dir: Path, pdf: bytes) -> None:
    """An agent's copy whose draft carries a stored file of `pdf`, as the notifier queues it."""
    digest = sha256_hex(pdf)
    content_path(state_dir, ATTACHMENTS_DIR, digest).parent.mkdir(parents=True)
    content_path(state_dir, ATTACHMENTS_DIR, digest).write_bytes(pdf)
    draft = Draft(
        message_id="<big.maildesk@desk.example>", date="Mon, 07 Dec 2026 10:00:00 +0000",
        sender=("Support", "support@desk.example"), to=("Léa", "lea@client.example"),
        subject="[#4] Export", text="Ci-joint.\n", html="<p>Ci-joint.</p>", language="fr",
        loop="desk.example", files=(DraftFile(digest, "application/pdf", "export.pdf"),),
    )
    with session_scope(engine) as session:
        session.add(Outbox(kind="agent_copy", message_id=draft.message_id, raw=b"",
                           mail_from="support@desk.example", draft=draft.to_json(),
                           recipients=json.dumps(["lea@client.example"])))  # fmt: skip


def test_a_draft_carrying_a_large_file_is_streamed_and_its_spool_file_removed(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    """The sender composes it into a spool file, sends that, and removes it (the compose
    child's side is in test_compose_worker.py)."""
    settings = make_settings(tmp_path, smtp_server)
    state_dir = settings.desk.state_dir
    pdf = random.Random(3).randbytes(3 * 2**20)
    queue_large_draft(engine, state_dir, pdf)
    assert OutboxSender(settings, engine).send_batch() == SendReport(sent=1)
    [mail] = smtp_server.mails
    [attached] = list(mail.message.iter_attachments())
    assert attached.get_content() == pdf
    assert list((state_dir / SPOOL_DIR).iterdir()) == []


def test_a_spool_that_cannot_be_written_defers_the_mail(
    engine: sa.Engine, smtp_server: RecordingSMTPServer, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, smtp_server)
    queue_large_draft(engine, settings.desk.state_dir, random.Random(4).randbytes(2**20))
    (settings.desk.state_dir / SPOOL_DIR).write_bytes(b"")  # Where the directory should be.
    assert OutboxSender(settings, engine).send_batch() == SendReport(retried=1)
    assert smtp_server.mails == []
