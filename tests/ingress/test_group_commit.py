"""Group commit: mails that arrive during a commit share the next one, and a failure stays there."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from e2e import CUSTOMER, DESK, customer_mail
from sqlmodel import Session, select

from maildesk.ingress.group_commit import MAX_MAILS, GroupCommit
from maildesk.mail.message import Delivery
from maildesk.store.intake import Accepted, Arrival, IntakeStore
from maildesk.store.models import RECEIVED, InboundMail

SMTP = Delivery(source="smtp", envelope_from=CUSTOMER, recipients=(DESK,))


def arrival(subject: str) -> Arrival:
    return Arrival(customer_mail(subject=subject).as_bytes(), SMTP)


class HeldStore:
    """The real intake store, whose first commit waits until the test lets it go on."""

    def __init__(self, engine: sa.Engine, state_dir: Path) -> None:
        self.intake = IntakeStore(engine, state_dir)
        self.groups: list[list[str]] = []
        self.entered = threading.Event()
        self.go_on = threading.Event()
        self.refuse: set[str] = set()

    def store(self, arrivals: Sequence[Arrival]) -> list[Accepted]:
        subjects = [str(customer_subject(a)) for a in arrivals]
        self.groups.append(subjects)
        if len(self.groups) == 1:
            self.entered.set()
            assert self.go_on.wait(10)
        if self.refuse & set(subjects):
            raise OSError("disk full")
        return self.intake.store(arrivals)


def customer_subject(item: Arrival) -> str:
    return next(line for line in item.raw.decode().splitlines() if line.startswith("Subject:"))[9:]


async def submit_while_the_first_commit_is_held(
    held: HeldStore, later: list[str]
) -> list[Accepted | BaseException]:
    group = GroupCommit(held.store)
    first = asyncio.create_task(group.submit(arrival("un")))
    assert await asyncio.to_thread(held.entered.wait, 10)
    others = [asyncio.create_task(group.submit(arrival(s))) for s in later]
    await asyncio.sleep(0)  # Each task runs up to its wait: all are submitted.
    held.go_on.set()
    return await asyncio.gather(first, *others, return_exceptions=True)


async def test_mails_that_arrive_during_a_commit_share_the_next_one(
    engine: sa.Engine, tmp_path: Path
) -> None:
    held = HeldStore(engine, tmp_path / "state")
    results = await submit_while_the_first_commit_is_held(held, ["deux", "trois", "quatre"])
    # The first mail was stored alone, without waiting for company; the three that came during
    # its commit were stored together.
    assert held.groups == [["un"], ["deux", "trois", "quatre"]]
    ids = [r.inbound_id for r in results if isinstance(r, Accepted)]
    assert len(set(ids)) == 4
    with Session(engine) as session:
        rows = session.exec(select(InboundMail).where(InboundMail.id.in_(ids))).all()  # type: ignore[union-attr]
    assert [r.outcome for r in rows] == [RECEIVED] * 4


async def test_a_group_that_cannot_be_stored_fails_its_own_mails_only(
    engine: sa.Engine, tmp_path: Path
) -> None:
    held = HeldStore(engine, tmp_path / "state")
    held.refuse = {"deux"}
    results = await submit_while_the_first_commit_is_held(held, ["deux", "trois"])
    first, second, third = results
    assert isinstance(first, Accepted)
    # Both mails of the refused group hear of it (the listener answers each 451); nothing of
    # theirs was stored.
    assert isinstance(second, OSError) and isinstance(third, OSError)
    with Session(engine) as session:
        assert len(session.exec(select(InboundMail)).all()) == 1


async def test_a_group_is_cut_at_its_size(engine: sa.Engine, tmp_path: Path) -> None:
    held = HeldStore(engine, tmp_path / "state")
    later = [f"m{n}" for n in range(MAX_MAILS + 1)]
    results = await submit_while_the_first_commit_is_held(held, later)
    assert [len(g) for g in held.groups] == [1, MAX_MAILS, 1]
    assert all(isinstance(r, Accepted) for r in results)
