"""Logs: JSON lines that never carry a reply token, a VERP token or a secret."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from maildesk.logs import configure_logging, get_logger, redact_tokens

TOKEN_ADDRESS = "support+t12-a-0123456789abcdef01234567@desk.example"


def test_tokens_are_redacted_wherever_they_appear(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", json=True)
    log = get_logger("test")
    log.info("rejected", recipient=TOKEN_ADDRESS.replace("desk.", "dsek."),
             bounce="support+bounce-3f9a1c2e7b4d8a60@desk.example", password="hunter2")
    try:
        raise ValueError(f"cannot send to {TOKEN_ADDRESS}")
    except ValueError:
        log.exception("failed")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["recipient"] == "support+[token]@dsek.example"
    assert lines[0]["bounce"] == "support+[token]@desk.example"
    assert lines[0]["password"] == "[redacted]"
    assert "0123456789abcdef" not in lines[1]["exception"]
    assert "support+[token]@desk.example" in lines[1]["exception"]


def test_other_plus_addresses_are_left_alone() -> None:
    assert redact_tokens("claire+support@client.example") == "claire+support@client.example"


@pytest.mark.parametrize(("log_format", "is_json"), [("json", True), ("console", False),
                                                      (None, True)])
def test_log_format_chooses_the_renderer(
    log_format: str | None, is_json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    # Under pytest stdout is no terminal, so unset means JSON.
    configure_logging("info", log_format=log_format)
    get_logger("test").info("mail processed", outcome="ticket", password="hunter2")
    line = capsys.readouterr().out.strip()
    if is_json:
        assert json.loads(line)["outcome"] == "ticket"
    else:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
        assert "mail processed" in line and "outcome" in line and "ticket" in line
    assert "hunter2" not in line


# The daemon's own imports, in a fresh interpreter: which of the heavy optional modules came in
# (rich through structlog, PostgreSQL's dialect for an engine that may be SQLite's),
# and whether rich can still be imported afterwards by whoever wants it.
IMPORTS_PROBE = """
import importlib.util, sys
import maildesk.daemon
print(sorted(m for m in ("rich", "pygments", "sqlalchemy.dialects.postgresql") if m in sys.modules))
if importlib.util.find_spec("rich") is not None:
    import rich
    print("rich importable")
"""


def test_the_daemon_loads_neither_rich_nor_an_unused_dialect() -> None:
    done = subprocess.run([sys.executable, "-c", IMPORTS_PROBE], capture_output=True, text=True,
                          check=True)
    lines = done.stdout.splitlines()
    assert lines[0] == "[]"
    if importlib.util.find_spec("rich") is not None:
        # Hidden only while structlog was imported: rich itself is untouched.
        assert lines[1:] == ["rich importable"]
