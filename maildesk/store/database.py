"""The database: its engine, its sessions and its schema version.

The schema comes only from the Alembic migrations in `maildesk/store/migrations`; `maildesk db
upgrade` applies them and `maildesk run` refuses to start on a database that lags behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from maildesk.store.write_turns import WriteTurns

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# The newest migration. Every command checks the schema against it, and importing Alembic to
# find it would cost each CLI call a third of a second; a test keeps the two in step.
SCHEMA_HEAD = "0008"


# How long a writer waits for SQLite's write lock (and for its turn, see write_turns.py).
BUSY_TIMEOUT_MS = 10000


class StoreError(Exception):
    """The database cannot be used as it is; the message says what to do."""


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the CLI read while the daemon writes; synchronous=FULL makes a commit durable
    # before we delete a mail from IMAP or answer 250, which is the whole point of the store.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.close()


def make_engine(url: str) -> sa.Engine:
    """An engine for `url`, with SQLite tuned for durability and concurrent readers."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if str(path) not in ("", ":memory:"):
            path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # hide_parameters: an error's text then carries no addresses or Message-IDs, so that
        # whatever logs it ("store unavailable", say) logs no personal data.
        engine = sa.create_engine(url, pool_pre_ping=True, hide_parameters=True)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise StoreError(f"[store] url: cannot use this database URL: {exc}") from None
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        WriteTurns(wait_seconds=BUSY_TIMEOUT_MS / 1000).attach(engine)
    return engine


def missing_database(url: str) -> Path | None:
    """The SQLite file that `url` names when it does not exist yet, else None.

    Opening such a URL would create an empty file (and its directory), so commands other than
    `db upgrade` look first and refuse instead.
    """
    if not url.startswith("sqlite:///"):
        return None
    path = Path(url.removeprefix("sqlite:///").partition("?")[0])
    if str(path) in ("", ":memory:") or path.exists():
        return None
    return path


@contextmanager
def session_scope(engine: sa.Engine) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def head_revision() -> str:
    """The newest migration that this maildesk knows."""
    return SCHEMA_HEAD


def current_revision(engine: sa.Engine) -> str | None:
    """The migration the database is at, or None for an empty database."""
    try:
        with engine.connect() as connection:
            if not sa.inspect(connection).has_table("alembic_version"):
                return None
            return connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    except sa.exc.OperationalError as exc:
        raise StoreError(f"cannot open the database: {exc.orig}") from None


def upgrade(engine: sa.Engine) -> tuple[str | None, str]:
    """Bring the schema to the newest migration; returns (before, after)."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    before = current_revision(engine)
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    command.upgrade(config, "head")
    return before, head_revision()


def check_schema(engine: sa.Engine) -> None:
    """Raise StoreError unless the database is at the newest migration."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        state = "empty" if current is None else f"at revision {current}"
        raise StoreError(
            f"the database schema is out of date ({state}, this maildesk needs {head}); "
            "run `maildesk db upgrade` first"
        )
