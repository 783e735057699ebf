"""The queue discipline that intake, the outbox and every later queue share.

A queue is a table whose rows carry `claimed_by`, `lease_until`, `attempts`, `next_attempt_at`
and `last_error`, and a condition saying which rows want work (a mail "received", a mail
"pending"). A worker claims a batch in one short transaction: it sets its own name and a lease
on each row and counts the attempt, then works outside any transaction and records each
outcome, releasing the row. A worker that dies leaves its claims behind; another takes them once
their lease has run out, and the same worker, restarted, takes its own back at once.

Attempts are counted when claiming, so that a row whose work kills the process counts too: a row
claimed `poison_after` times without an outcome is handed to the caller as poison (the intake
quarantines it) instead of being worked on again, and the rows behind it go on.

Leases are measured on the database's clock, which every instance shares, never on a host's:
`now()` on PostgreSQL, `strftime('%f', 'now')` on SQLite. Tests may pass a clock instead.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from maildesk.store.models import UTCDateTime

Clock = Callable[[], datetime]


def database_time(
    engine: sa.Engine | sa.Connection, offset: timedelta = timedelta(0), clock: Clock | None = None
) -> sa.ColumnElement[Any]:
    """The database's clock plus `offset`, as a SQL expression (or `clock`'s time, in tests)."""
    if clock is not None:
        return sa.literal(clock() + offset, type_=UTCDateTime())
    if engine.dialect.name == "sqlite":
        # Microseconds, written as SQLAlchemy writes them, so that stored and computed times
        # compare as strings and read back right.
        modifier = f"{offset.total_seconds():+.3f} seconds"
        return sa.func.strftime("%Y-%m-%d %H:%M:%f", "now", modifier).concat("000")
    return sa.func.now() + sa.literal(offset, type_=sa.Interval())


def backoff(
    retries: int,
    *,
    first: timedelta = timedelta(minutes=1),
    most: timedelta = timedelta(hours=1),
    jitter: float = 0.2,
) -> timedelta:
    """The wait before retry number `retries` (1-based): `first`, doubling, capped at `most`.

    The jitter takes up to that share off, so that rows that failed together (a relay that was
    down) are not all retried in the same second.
    """
    base = min(first * 2 ** min(max(retries, 1) - 1, 30), most)
    return base * (1 - jitter * random.random())  # noqa: S311 - spreading retries, not secrets


@dataclass(frozen=True)
class Queue:
    """A table run as a queue: which rows want work and what claiming or releasing sets."""

    table: sa.Table
    # Rows in a state that wants work, whoever holds them.
    wanted: sa.ColumnElement[bool]
    # Extra values set on claim (e.g. a status shown to operators) and when a claim is given back.
    on_claim: Mapping[str, Any] = field(default_factory=dict)
    on_release: Mapping[str, Any] = field(default_factory=dict)
    # Claims without an outcome after which a row is poison.
    poison_after: int = 3


@dataclass(frozen=True)
class Claim:
    """A row claimed by this worker, with the columns asked for."""

    row: Any
    poison: bool

    @property
    def id(self) -> int:
        """The row's id."""
        return int(self.row.id)


class QueueWorker:
    """Claims, renews, records and gives back rows of one queue in the name of `owner`."""

    def __init__(
        self,
        engine: sa.Engine,
        queue: Queue,
        *,
        owner: str,
        lease: timedelta = timedelta(seconds=60),
        clock: Clock | None = None,
    ) -> None:
        """Work on `queue` as `owner`; `clock` replaces the database's clock (tests)."""
        self.engine = engine
        self.queue = queue
        self.owner = owner
        self.lease = lease
        self.clock = clock
        self.c = queue.table.c
        # How many rows the last claim picked: fewer claimed means others took some meanwhile,
        # fewer picked means the queue had no more.
        self.last_picked = 0

    def now(self) -> sa.ColumnElement[Any]:
        """The current time as a SQL expression: the database's clock, or the test clock."""
        return self._at(timedelta(0))

    def _at(self, offset: timedelta) -> sa.ColumnElement[Any]:
        return database_time(self.engine, offset, self.clock)

    def claimable(self) -> sa.ColumnElement[bool]:
        """Rows that want work, are due, and are held by nobody (or by a lapsed lease)."""
        c, now = self.c, self.now()
        return sa.and_(
            self.queue.wanted,
            sa.or_(c.next_attempt_at.is_(None), c.next_attempt_at <= now),
            sa.or_(c.claimed_by.is_(None), c.lease_until.is_(None), c.lease_until < now),
        )

    def claim(
        self,
        limit: int,
        columns: Sequence[sa.ColumnElement[Any]] = (),
        *,
        where: sa.ColumnElement[bool] | None = None,
        alone: sa.ColumnElement[bool] | None = None,
        weight: sa.ColumnElement[int] | None = None,
        budget: int | None = None,
    ) -> list[Claim]:
        """Lease up to `limit` of the oldest claimable rows, in one transaction.

        Rows for which `alone` holds come first and one at a time: a suspect, such as a row
        claimed before without an outcome, is worked on by itself. With `weight` and `budget`,
        the claim also stops before the rows' weights add up to more than `budget` (the first
        row is always taken, whatever it weighs).
        """
        c = self.c
        flag = alone if alone is not None else sa.false()
        weighs = weight if weight is not None and budget is not None else sa.literal(0)
        pick = (
            sa.select(c.id, sa.case((flag, 1), else_=0).label("alone"), weighs.label("weight"))
            .where(self.claimable())
            .order_by(sa.case((flag, 0), else_=1), c.id)
            .limit(limit)
        )
        if where is not None:
            pick = pick.where(where)
        with self.engine.begin() as conn:
            # SKIP LOCKED lets PostgreSQL workers pass over each other's rows; SQLite ignores
            # it and serialises writers, and the UPDATE repeats the condition in either case,
            # so a row taken by another worker between the two statements is left alone.
            picked = conn.execute(pick.with_for_update(skip_locked=True)).all()
            self.last_picked = len(picked)
            if not picked:
                return []
            if picked[0].alone:
                ids = [picked[0].id]
                self.last_picked = limit  # More may wait behind the suspect.
            else:
                ids = _within(picked, budget)
                if len(ids) < len(picked):
                    self.last_picked = limit  # The budget, not the queue, ended the claim.
            rows = conn.execute(
                sa.update(self.queue.table)
                .where(c.id.in_(ids), self.claimable())
                .values(claimed_by=self.owner, lease_until=self._at(self.lease),
                        attempts=c.attempts + 1, **self.queue.on_claim)
                .returning(c.id, c.attempts, c.last_error, *columns)
            ).all()  # fmt: skip
        # RETURNING follows no particular order: oldest first.
        return [
            Claim(row, poison=row.attempts > self.queue.poison_after)
            for row in sorted(rows, key=lambda r: r.id)
        ]

    def renew(self, ids: Sequence[int]) -> int:
        """Extend the lease on rows still held; returns how many are."""
        if not ids:
            return 0
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.update(self.queue.table)
                .where(self.c.id.in_(list(ids)), self.c.claimed_by == self.owner)
                .values(lease_until=self._at(self.lease))
            )
        return int(result.rowcount)

    def held(self, row_id: int) -> sa.ColumnElement[bool]:
        """The condition that this worker still holds a row: every outcome is recorded under it."""
        return sa.and_(self.c.id == row_id, self.c.claimed_by == self.owner)

    def release_values(
        self, *, retry_in: timedelta | None = None, error: str | None = None,
        uncount: bool = False, **values: Any,
    ) -> dict[str, Any]:  # fmt: skip
        """The values that give a row back: due again at once or after `retry_in`.

        `uncount` takes back the attempt counted by the claim, for work that was not tried at
        all (the database went away, the worker was stopped).
        """
        out: dict[str, Any] = {"claimed_by": None, "lease_until": None, **self.queue.on_release}
        if retry_in is not None:
            out["next_attempt_at"] = self._at(retry_in)
        if error is not None:
            out["last_error"] = error[:2000]
        if uncount:
            out["attempts"] = sa.case((self.c.attempts > 0, self.c.attempts - 1), else_=0)
        out.update(values)
        return out

    def release(self, ids: Sequence[int], **kwargs: Any) -> int:
        """Give rows back (see release_values); returns how many this worker still held."""
        if not ids:
            return 0
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.update(self.queue.table)
                .where(self.c.id.in_(list(ids)), self.c.claimed_by == self.owner)
                .values(**self.release_values(**kwargs))
            )
        return int(result.rowcount)

    def take_back(self) -> int:
        """At start-up: release every claim this owner left, so its rows are due at once.

        Their attempts stay counted: a claim that ended with the process may have ended it.
        """
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.update(self.queue.table)
                .where(self.c.claimed_by == self.owner, self.queue.wanted)
                .values(claimed_by=None, lease_until=None, **self.queue.on_release)
            )
        return int(result.rowcount)

    def depth(self) -> int:
        """How many rows want work, held or not."""
        with self.engine.connect() as conn:
            count = conn.execute(
                sa.select(sa.func.count()).select_from(self.queue.table).where(self.queue.wanted)
            ).scalar_one()
        return int(count)


def _within(picked: Sequence[Any], budget: int | None) -> list[int]:
    """The ids of the first picked rows whose weights fit in `budget`; at least one."""
    if budget is None:
        return [row.id for row in picked]
    ids: list[int] = []
    total = 0
    for row in picked:
        total += row.weight or 0
        if ids and total > budget:
            break
        ids.append(row.id)
    return ids
