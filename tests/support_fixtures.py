"""Fixtures for maildesk itself: a config file, a store on SQLite or PostgreSQL, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from e2e import DESK, seed

from maildesk.config import DeskSettings, SecuritySettings, Settings
from maildesk.pipeline import Pipeline
from maildesk.store import database

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL for an empty database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def engine(store_url: str) -> Iterator[sa.Engine]:
    """An engine on a database upgraded to the newest schema."""
    engine = database.make_engine(store_url)
    database.upgrade(engine)
    yield engine
    engine.dispose()


@dataclass
class CliResult:
    """What one run of the `maildesk` command did."""

    code: int
    out: str
    err: str


@dataclass
class Desk:
    """A maildesk installation in a temporary directory, driven as a process."""

    directory: Path
    config: Path

    def write_config(self, text: str) -> None:
        """Replace the config file's contents."""
        self.config.write_text(text, encoding="utf-8")

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> CliResult:
        """Run `maildesk --config CONFIG ARGS…` and return its exit code and output."""
        full_env = {**os.environ, **(env or {})}
        full_env.pop("MAILDESK_CONFIG", None)
        proc = subprocess.run(
            [sys.executable, "-m", "maildesk", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            cwd=self.directory,
            env=full_env,
            timeout=timeout,
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)


def base_config(state_dir: Path, store_url: str) -> str:
    """A minimal config: state in `state_dir`, the given store, the listener off."""
    return (
        f'[desk]\nstate_dir = "{state_dir}"\naddress = "support@desk.example"\n'
        f'[store]\nurl = "{store_url}"\n'
        "[listener]\nenabled = false\n"
    )


def make_desk(directory: Path, store_url: str) -> Desk:
    """A configured desk on `store_url`, with its schema upgraded."""
    desk = Desk(directory=directory, config=directory / "config.toml")
    desk.write_config(base_config(directory / "state", store_url))
    engine = database.make_engine(store_url)
    database.upgrade(engine)
    engine.dispose()
    return desk


@pytest.fixture
def desk(tmp_path: Path) -> Desk:
    """A configured desk on SQLite whose schema is current.

    The CLI tests run on SQLite only, since every process costs a second of imports; the
    directory and store tests cover PostgreSQL in-process, and one CLI test covers it too.
    """
    return make_desk(tmp_path, f"sqlite:///{tmp_path / 'state' / 'maildesk.sqlite3'}")


def make_pipeline(engine: sa.Engine, tmp_path: Path, **security: str) -> Pipeline:
    """A pipeline on a seeded store (see e2e.seed), with extra [security] values."""
    settings = Settings(
        desk=DeskSettings(address=DESK, state_dir=tmp_path / "state"),
        security=SecuritySettings(reply_key="k", **security),  # type: ignore[arg-type]
    )
    seed(engine)
    return Pipeline(settings, engine)


@pytest.fixture
def pipeline(engine: sa.Engine, tmp_path: Path) -> Pipeline:
    """A pipeline on a seeded store, on SQLite and PostgreSQL."""
    return make_pipeline(engine, tmp_path)
