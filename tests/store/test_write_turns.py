"""Writer turns on a real SQLite file: one writing transaction at a time in the process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from maildesk.store.write_turns import WriteTurns


@pytest.fixture
def turns_and_engine(tmp_path: Path) -> Iterator[tuple[WriteTurns, sa.Engine]]:
    """An engine on a fresh SQLite file whose own busy handler never waits."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'turns.sqlite3'}")

    def no_busy_wait(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=0")
        cursor.close()

    sa.event.listen(engine, "connect", no_busy_wait)
    turns = WriteTurns(wait_seconds=30)
    turns.attach(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (who TEXT)"))
    yield turns, engine
    engine.dispose()


def test_a_write_takes_the_turn_and_its_transaction_gives_it_back(
    turns_and_engine: tuple[WriteTurns, sa.Engine],
) -> None:
    turns, engine = turns_and_engine
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT count(*) FROM t"))
        assert not turns.taken()  # Reading takes no turn.
        conn.execute(sa.text("INSERT INTO t VALUES ('a')"))
        assert turns.taken()
        conn.commit()
        assert not turns.taken()
        conn.execute(sa.text("INSERT INTO t VALUES ('b')"))
        conn.rollback()
        assert not turns.taken()
        conn.execute(sa.text("UPDATE t SET who = 'c'"))
    # Handed back to the pool mid-transaction: the pool's reset gives the turn back.
    assert not turns.taken()


def test_a_second_writer_waits_for_its_turn_instead_of_failing_on_the_lock(
    turns_and_engine: tuple[WriteTurns, sa.Engine],
) -> None:
    """SQLite's busy handler is off here: without turns the second INSERT would fail at once
    with "database is locked"."""
    turns, engine = turns_and_engine
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO t VALUES ('second')"))
        except BaseException as exc:
            errors.append(exc)

    with engine.connect() as first:
        first.execute(sa.text("INSERT INTO t VALUES ('first')"))
        thread = threading.Thread(target=second)
        thread.start()
        deadline = time.monotonic() + 10
        while turns.waiting == 0 and thread.is_alive():
            assert time.monotonic() < deadline, "the second writer never asked for its turn"
            time.sleep(0.005)
        assert turns.waiting == 1  # It waits in the process, not inside SQLite.
        first.commit()
    thread.join(10)
    assert errors == []
    with engine.connect() as conn:
        assert [r[0] for r in conn.execute(sa.text("SELECT who FROM t ORDER BY rowid"))] == [
            "first", "second"]
