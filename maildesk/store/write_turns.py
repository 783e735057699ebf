"""Writer turns: one writing transaction at a time among a process's connections to SQLite.

SQLite has one write lock per database, and a connection that finds it taken waits in its busy
handler, which polls by sleeping 1, 2, 5, 10 ... up to 100 ms at a time. Under load the daemon's
stages (intake, the runner, the sender) then lose the lock to whoever polls at the right moment,
and a sender that wants to record ten sent mails may sleep through several of the runner's
batches. A lock in the process gives the write lock to the next stage the moment the previous
transaction ends, in the order they asked.

A connection takes its turn at its first writing statement (pysqlite opens the transaction
there too) and gives it back when its transaction ends: commit, rollback, or the pool's reset of
a connection handed back mid-transaction. Other processes (the CLI, another instance) are still
kept in order by SQLite's own lock. A turn that does not come within the busy timeout is not
waited for any longer: the statement then goes to SQLite, which waits or fails as it always did.
"""

from __future__ import annotations

import threading
from typing import Any

import sqlalchemy as sa

from maildesk.logs import get_logger

log = get_logger("store")

_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "ALTER", "DROP")


class WriteTurns:
    """One engine's turns at SQLite's write lock."""

    def __init__(self, wait_seconds: float) -> None:
        self.wait_seconds = wait_seconds
        self._lock = threading.Lock()
        self._holder: object | None = None  # The DBAPI connection whose turn it is.
        # Connections waiting for their turn now (for metrics and tests).
        self.waiting = 0

    def attach(self, engine: sa.Engine) -> None:
        """Have the engine's connections take turns to write."""
        sa.event.listen(engine, "before_cursor_execute", self._before_execute)
        # The turn passes on once SQLite's own commit or rollback is done, not before (the
        # "commit" event comes before it): the next writer then finds the lock free. The
        # pool's reset of a connection handed back mid-transaction is a rollback too.
        dialect = engine.dialect
        commit, rollback = dialect.do_commit, dialect.do_rollback

        def do_commit(dbapi_connection: Any) -> None:
            try:
                commit(dbapi_connection)
            finally:
                self._give_back(dbapi_connection)

        def do_rollback(dbapi_connection: Any) -> None:
            try:
                rollback(dbapi_connection)
            finally:
                self._give_back(dbapi_connection)

        dialect.do_commit = do_commit  # type: ignore[method-assign]
        dialect.do_rollback = do_rollback  # type: ignore[method-assign]
        for name in ("invalidate", "close"):
            sa.event.listen(engine.pool, name, self._pool_event)

    def _before_execute(self, conn: sa.Connection, _cursor: Any, statement: str,
                        *_args: Any) -> None:  # fmt: skip
        dbapi_connection = conn.connection.dbapi_connection
        if self._holder is dbapi_connection:
            return
        if not statement.lstrip()[:7].upper().startswith(_WRITES):
            return
        self.waiting += 1
        try:
            if self._lock.acquire(timeout=self.wait_seconds):
                self._holder = dbapi_connection
            else:
                log.warning("write turn not given within the busy timeout",
                            waited=self.wait_seconds)
        finally:
            self.waiting -= 1

    def taken(self) -> bool:
        """Whether a connection of this process holds the turn now."""
        return self._lock.locked()

    def _pool_event(self, dbapi_connection: Any, *_args: Any) -> None:
        self._give_back(dbapi_connection)

    def _give_back(self, connection: Any) -> None:
        # The dialect is handed the pool's proxy of the DBAPI connection, the pool the bare one.
        dbapi_connection = getattr(connection, "dbapi_connection", connection)
        if dbapi_connection is not None and self._holder is dbapi_connection:
            self._holder = None
            self._lock.release()
