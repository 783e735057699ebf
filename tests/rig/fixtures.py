"""Pytest fixtures for the real-server test rig (loaded from tests/conftest.py).

Scopes: Dovecot and PostgreSQL run once per session because they take about a
second to start; every test still gets its own IMAP user and its own database.
The SMTP server starts per test because that costs only milliseconds and gives
each test a clean recording and failure mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from .dovecot import DovecotServer, ImapAccount
from .postgres import PostgresCluster
from .smtp import RecordingSMTPServer


def _start_or_fail(start: Callable[[], None]) -> None:
    """Start a server, turning a RuntimeError into a plain pytest failure."""
    try:
        start()
    except RuntimeError as error:
        message = str(error)
    else:
        return
    # A missing or broken server is a setup error, never a reason to skip. Failing
    # outside the except block keeps pytest from printing a chained traceback.
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def dovecot_server() -> Iterator[DovecotServer]:
    """Yield a Dovecot IMAP server shared by the whole test session."""
    server = DovecotServer()
    _start_or_fail(server.start)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_dovecot() -> Iterator[DovecotServer]:
    """Yield a Dovecot of this test's own, which it may stop and restart."""
    server = DovecotServer()
    _start_or_fail(server.start)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def imap_account(dovecot_server: DovecotServer) -> ImapAccount:
    """Return a freshly created IMAP user with an empty INBOX."""
    return dovecot_server.add_user()


@pytest.fixture
def smtp_server() -> Iterator[RecordingSMTPServer]:
    """Yield a recording SMTP server started for this test only."""
    server = RecordingSMTPServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """Yield a PostgreSQL cluster shared by the whole test session."""
    cluster = PostgresCluster()
    _start_or_fail(cluster.start)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """Yield a SQLAlchemy URL of a new, empty database that is dropped afterwards."""
    name = postgres_cluster.create_database()
    try:
        yield postgres_cluster.url(name)
    finally:
        postgres_cluster.drop_database(name)
