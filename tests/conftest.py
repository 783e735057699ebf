"""What every test shares: the rig's fixtures, and logging put back after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

pytest_plugins = ["rig.fixtures", "support_fixtures"]


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """Put structlog's configuration back after each test.

    A test that configures logging (tests/test_logs.py, a CLI command run in process) binds it
    to the stream of its own capture, which pytest closes after the test: every later log line
    would raise "I/O operation on closed file" inside the code under test.
    """
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
