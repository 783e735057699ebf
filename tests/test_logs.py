"""Logs: JSON lines that never carry a reply token, a VERP token or a secret."""

from __future__ import annotations

import json

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
