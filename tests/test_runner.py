"""The intake runner on SQLite and PostgreSQL: batches, savepoints, attempts and poison."""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from e2e import CUSTOMER, DESK, customer_mail
from sqlmodel import Session, select
from support_fixtures import make_pipeline

from maildesk.mail.message import Delivery, MalformedMail, Outcome, ParsedMail
from maildesk.pipeline import Pipeline
from maildesk.runner import IntakeRunner
from maildesk.store.files import ATTACHMENTS_DIR, SPOOL_DIR, content_path
from maildesk.store.intake import INTAKE_QUEUE, Arrival, IntakeStore, store_arrivals
from maildesk.store.models import Attachment, InboundMail, Outbox, Ticket, utcnow
from maildesk.store.queue import QueueWorker

SMTP = Delivery(source="smtp", envelope_from=CUSTOMER, recipients=(DESK,))


class Flaky:
    """The pipeline, except that a mail whose subject says so raises `error` when filed."""

    def __init__(self, pipeline: Pipeline, error: BaseException) -> None:
        self.pipeline = pipeline
        self.settings = pipeline.settings
        self.engine = pipeline.engine
        self.error = error

    def parse(self, raw: bytes) -> ParsedMail:
        return self.pipeline.parse(raw)

    def file(
        self, session: Session, inbound: InboundMail, raw: bytes, delivery: Delivery,
        parsed: ParsedMail | MalformedMail | None,
    ) -> Outcome:  # fmt: skip
        outcome = self.pipeline.file(session, inbound, raw, delivery, parsed)
        if isinstance(parsed, ParsedMail) and parsed.subject.startswith("boom"):
            # Raised after the mail's rows were written: the savepoint must take them back.
            raise self.error
        return outcome


def stored(pipeline: Pipeline, *subjects: str) -> list[int]:
    arrivals = [Arrival(customer_mail(subject=s).as_bytes(), SMTP) for s in subjects]
    accepted = store_arrivals(pipeline.engine, pipeline.settings.desk.state_dir, arrivals)
    return [a.inbound_id for a in accepted]


def inbound(engine: sa.Engine, row_id: int) -> InboundMail:
    with Session(engine) as session:
        row = session.get(InboundMail, row_id)
        assert row is not None
        return row


def count(engine: sa.Engine, model: Any) -> int:
    with Session(engine) as session:
        return len(session.exec(select(model)).all())


def test_a_failing_mail_rolls_back_alone_and_is_quarantined_at_the_third_failure(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    ids = stored(pipeline, "one", "two", "boom", "four")
    runner = IntakeRunner(Flaky(pipeline, RuntimeError("a bug")), owner="test")
    assert runner.file_batch() == 4
    # Three tickets, each with its acknowledgement and the agent's copy; nothing of "boom".
    assert count(engine, Ticket) == 3 and count(engine, Outbox) == 6
    failed = inbound(engine, ids[2])
    assert (failed.outcome, failed.attempts, failed.claimed_by) == ("received", 1, None)
    assert failed.last_error == "RuntimeError: a bug"
    assert runner.file_batch() == 1
    assert inbound(engine, ids[2]).attempts == 2
    assert runner.file_batch() == 1
    failed = inbound(engine, ids[2])
    assert (failed.outcome, failed.reason) == ("quarantined", "internal error: RuntimeError")
    assert failed.last_error == "RuntimeError: a bug" and failed.claimed_by is None
    assert runner.file_batch() == 0
    assert count(engine, Ticket) == 3


def test_an_error_outside_the_savepoints_commits_nothing_of_the_batch(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    """The batch is one transaction: on SQLite too, a savepoint's release commits nothing."""
    ids = stored(pipeline, "one", "two", "boom")
    runner = IntakeRunner(Flaky(pipeline, KeyboardInterrupt()), owner="test")
    with pytest.raises(KeyboardInterrupt):
        runner.file_batch()
    assert count(engine, Ticket) == 0 and count(engine, Outbox) == 0
    # Given back, uncounted: the interruption says nothing about the mails.
    assert [(inbound(engine, i).outcome, inbound(engine, i).attempts) for i in ids] == [
        ("received", 0)] * 3


def test_a_mail_whose_claims_never_ended_is_poison_after_four(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    """Four claims that lapsed without an outcome (the process died filing it; the first time
    the culprit may have been a neighbour): quarantined, and the mail behind it is filed."""
    [dying, behind] = stored(pipeline, "dies", "fine")
    now = utcnow()
    clock = {"now": now}
    crashing = QueueWorker(engine, INTAKE_QUEUE, owner="gone", lease=timedelta(seconds=30),
                           clock=lambda: clock["now"])  # fmt: skip
    for _ in range(4):
        [claim] = crashing.claim(1, where=INTAKE_QUEUE.table.c.id == dying)
        assert not claim.poison
        clock["now"] += timedelta(minutes=1)  # The lease lapses; nobody records anything.
    runner = IntakeRunner(pipeline, owner="test", clock=lambda: clock["now"])
    # The suspect goes alone, then the mail behind it.
    assert runner.file_batch() == 1
    assert runner.file_batch() == 1
    poisoned = inbound(engine, dying)
    assert (poisoned.outcome, poisoned.reason) == (
        "quarantined", "internal error: the runner stopped while filing it")
    assert poisoned.attempts == 5
    assert inbound(engine, behind).outcome == "ticket"


def test_a_claim_held_under_a_live_lease_is_left_alone_and_its_owner_takes_it_back(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    [row_id] = stored(pipeline, "held")
    holder = QueueWorker(engine, INTAKE_QUEUE, owner="me", lease=timedelta(minutes=5))
    assert [c.id for c in holder.claim(10)] == [row_id]
    other = IntakeRunner(pipeline, owner="someone else")
    assert other.file_batch() == 0
    # Restarted, the holder takes its claim back at once, and the attempt stays counted.
    assert holder.take_back() == 1
    assert inbound(engine, row_id).attempts == 1
    assert other.file_batch() == 1
    assert inbound(engine, row_id).outcome == "ticket"


def test_leases_are_measured_on_the_database_clock(pipeline: Pipeline, engine: sa.Engine) -> None:
    [row_id] = stored(pipeline, "lease")
    worker = QueueWorker(engine, INTAKE_QUEUE, owner="me", lease=timedelta(seconds=90))
    with engine.connect() as conn:
        database_now = conn.execute(sa.select(worker.now())).scalar_one()
    worker.claim(1)
    lease_until = inbound(engine, row_id).lease_until
    assert lease_until is not None
    # SQLite's clock comes back as UTC text.
    if isinstance(database_now, str):
        database_now = datetime.fromisoformat(database_now).replace(tzinfo=UTC)
    lease = lease_until - database_now
    assert timedelta(seconds=89) <= lease <= timedelta(seconds=91)


def test_batches_are_claimed_oldest_first_and_bounded(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    ids = stored(pipeline, *[f"mail {n}" for n in range(7)])
    runner = IntakeRunner(pipeline, owner="test", batch_size=3)
    assert runner.file_batch() == 3
    assert [inbound(engine, i).outcome for i in ids] == ["ticket"] * 3 + ["received"] * 4
    assert runner.file_batch() + runner.file_batch() == 4
    assert runner.file_batch() == 0


def test_a_batch_stops_short_of_its_byte_budget_and_a_large_mail_goes_alone(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    sizes = [30_000, 30_000, 30_000, 90_000, 10_000, 10_000]
    arrivals = [Arrival(customer_mail(subject=f"mail {n}", text="x" * size).as_bytes(), SMTP)
                for n, size in enumerate(sizes)]
    ids = [a.inbound_id for a in
           store_arrivals(engine, pipeline.settings.desk.state_dir, arrivals)]
    runner = IntakeRunner(pipeline, owner="test", batch_size=20, batch_bytes=70_000)
    claimed = []
    while taken := runner.file_batch():
        claimed.append(taken)
    # 30+30 fit, a third would not; the 90 KB mail exceeds the budget and goes alone.
    assert claimed == [2, 1, 1, 2]
    assert [inbound(engine, i).outcome for i in ids] == ["ticket"] * 6


def test_a_missing_raw_file_fails_the_mail_not_the_batch(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    [lost, kept] = stored(pipeline, "lost", "kept")
    (pipeline.settings.desk.state_dir / inbound(engine, lost).raw_path).unlink()
    runner = IntakeRunner(pipeline, owner="test")
    for _ in range(3):
        runner.file_batch()
    row = inbound(engine, lost)
    assert (row.outcome, row.reason) == ("quarantined", "internal error: FileNotFoundError")
    assert inbound(engine, kept).outcome == "ticket"


def test_a_large_attachment_goes_from_the_parse_child_to_the_store_and_the_spool_empties(
    engine: sa.Engine, tmp_path: Path
) -> None:
    pipeline = make_pipeline(engine, tmp_path)
    daemon_like = Pipeline(pipeline.settings, engine, parse_in_worker=True)
    state_dir = pipeline.settings.desk.state_dir
    pdf = random.Random(7).randbytes(3 * 2**20)
    mails = []
    for sender in (CUSTOMER, "stranger@elsewhere.example"):
        mail = customer_mail(subject=f"export from {sender}", sender=sender)
        mail.add_attachment(pdf, maintype="application", subtype="pdf", filename="export.pdf")
        mails.append(Arrival(mail.as_bytes(), SMTP))
    try:
        ids = [a.inbound_id for a in store_arrivals(engine, state_dir, mails)]
        assert IntakeRunner(daemon_like, owner="test").file_batch() == 1  # Over 1 MiB: alone.
        assert IntakeRunner(daemon_like, owner="test").file_batch() == 1
    finally:
        assert daemon_like.parser is not None
        daemon_like.parser.close()
    assert [inbound(engine, i).outcome for i in ids] == ["ticket", "quarantined"]
    with Session(engine) as session:
        [row] = session.exec(select(Attachment)).all()
    assert (row.filename, row.size, row.sha256) == (
        "export.pdf",
        len(pdf),
        hashlib.sha256(pdf).hexdigest(),
    )
    assert content_path(state_dir, ATTACHMENTS_DIR, row.sha256).read_bytes() == pdf
    # The customer's file moved into the store; the stranger's, quarantined, was removed.
    assert list((state_dir / SPOOL_DIR).iterdir()) == []


def hand_over(pipeline: Pipeline, runner: IntakeRunner, *subjects: str) -> list[int]:
    """Store mails through an intake store that hands them to `runner`, as the daemon's does."""
    intake = IntakeStore(pipeline.engine, pipeline.settings.desk.state_dir,
                         handoff=runner.handoff)  # fmt: skip
    arrivals = [Arrival(customer_mail(subject=s).as_bytes(), SMTP) for s in subjects]
    return [a.inbound_id for a in intake.store(arrivals)]


def test_mail_stored_while_the_runner_idles_is_handed_over_claimed(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    """Stored claimed for the idle runner, filed from the hand-over with no claim of its own."""
    runner = IntakeRunner(pipeline, owner="test")
    runner.handoff.set_idle(True)
    ids = hand_over(pipeline, runner, "one", "two")
    row = inbound(engine, ids[0])
    assert (row.outcome, row.claimed_by, row.attempts) == ("received", "test", 1)
    # Held by that claim: an ordinary claim, even the runner's own, passes them by.
    plain = IntakeRunner(pipeline, owner="test")
    assert plain.file_batch() == 0
    runner.handoff.set_idle(False)
    assert runner.file_batch() == 2
    for row_id in ids:
        row = inbound(engine, row_id)
        assert (row.outcome, row.attempts, row.claimed_by) == ("ticket", 1, None)
    assert count(engine, Ticket) == 2
    assert runner.file_batch() == 0


def test_mail_stored_while_the_runner_works_waits_for_its_claim(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    """A busy runner is handed nothing: the mail is stored unclaimed, and claimed as usual."""
    runner = IntakeRunner(pipeline, owner="test")
    [row_id] = hand_over(pipeline, runner, "one")
    row = inbound(engine, row_id)
    assert (row.claimed_by, row.attempts) == (None, 0)
    assert runner.handoff.take() == []
    assert runner.file_batch() == 1
    assert inbound(engine, row_id).outcome == "ticket"


def test_a_batch_larger_than_one_claim_is_not_handed_over(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    """More mails than one claim takes are stored unclaimed, for the runner's bounded claims."""
    runner = IntakeRunner(pipeline, owner="test", batch_size=2)
    runner.handoff.set_idle(True)
    ids = hand_over(pipeline, runner, "one", "two", "three")
    assert [inbound(engine, i).claimed_by for i in ids] == [None, None, None]
    assert runner.handoff.take() == []


def test_a_duplicate_is_not_handed_over(pipeline: Pipeline, engine: sa.Engine) -> None:
    """Bytes stored before are that earlier row's: nothing new to claim or hand over."""
    runner = IntakeRunner(pipeline, owner="test")
    raw = customer_mail(subject="twice").as_bytes()
    store_arrivals(engine, pipeline.settings.desk.state_dir, [Arrival(raw, SMTP)])
    runner.handoff.set_idle(True)
    intake = IntakeStore(engine, pipeline.settings.desk.state_dir, handoff=runner.handoff)
    [accepted] = intake.store([Arrival(raw, SMTP)])
    assert accepted.duplicate
    assert runner.handoff.take() == []


def test_a_crash_after_the_hand_over_files_the_mail_once_after_restart(
    pipeline: Pipeline, engine: sa.Engine
) -> None:
    """The hand-over dies with the process; the restarted runner takes its claims back."""
    dead = IntakeRunner(pipeline, owner="test")
    dead.handoff.set_idle(True)
    ids = hand_over(pipeline, dead, "one", "two")
    restarted = IntakeRunner(pipeline, owner="test")
    assert restarted.worker.take_back() == 2
    # Their attempt stays counted, so each is a suspect and filed alone.
    assert restarted.file_batch() == 1
    assert restarted.file_batch() == 1
    assert restarted.file_batch() == 0
    assert [inbound(engine, i).outcome for i in ids] == ["ticket", "ticket"]
    assert count(engine, Ticket) == 2
