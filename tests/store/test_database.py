"""The database: migrations, schema checks and durability settings, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from maildesk.store import database
from maildesk.store.models import SQLModel


def test_the_head_constant_matches_the_migrations() -> None:
    config = Config()
    config.set_main_option("script_location", str(database.MIGRATIONS_DIR))
    assert ScriptDirectory.from_config(config).get_current_head() == database.SCHEMA_HEAD


def test_upgrade_creates_the_schema_the_models_describe(store_url: str) -> None:
    engine = database.make_engine(store_url)
    with pytest.raises(database.StoreError, match="run `maildesk db upgrade` first"):
        database.check_schema(engine)
    assert database.upgrade(engine) == (None, database.SCHEMA_HEAD)
    database.check_schema(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, SQLModel.metadata)
    assert differences == []
    assert database.upgrade(engine) == (database.SCHEMA_HEAD, database.SCHEMA_HEAD)
    engine.dispose()


def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    engine = database.make_engine(f"sqlite:///{tmp_path / 'x' / 'db.sqlite3'}")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_a_bad_url_is_a_clear_error() -> None:
    with pytest.raises(database.StoreError, match=r"\[store\] url"):
        database.make_engine("nosuchdb://x")


def test_an_unreachable_database_is_a_clear_error() -> None:
    engine = database.make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(database.StoreError, match="cannot open the database"):
        database.current_revision(engine)


def test_session_scope_rolls_back_on_error(engine: sa.Engine) -> None:
    from maildesk.store.models import Company

    with pytest.raises(RuntimeError), database.session_scope(engine) as session:
        session.add(Company(name="Ghost"))
        session.flush()
        raise RuntimeError("boom")
    with database.session_scope(engine) as session:
        assert session.exec(sa.select(Company)).all() == []  # type: ignore[call-overload]
