"""Signed reply addresses."""

from __future__ import annotations

from pathlib import Path

from maildesk.config import DeskSettings, Settings
from maildesk.signing import load_reply_key, reply_address, verify_reply_address

DESK = "support@desk.example"


def test_a_reply_address_is_valid_for_its_ticket_and_recipient_only() -> None:
    address = reply_address(b"k", DESK, 42, "Claire@Client.example")
    assert address.startswith("support+t42-") and address.endswith("@desk.example")
    signed = verify_reply_address(b"k", DESK, address.upper(), "claire@client.example")
    assert signed is not None and signed.ticket_id == 42
    assert verify_reply_address(b"k", DESK, address, "eve@client.example") is None
    assert verify_reply_address(b"other", DESK, address, "claire@client.example") is None
    forged = address.replace("t42-", "t43-")
    assert verify_reply_address(b"k", DESK, forged, "claire@client.example") is None
    assert verify_reply_address(b"k", DESK, "support@desk.example", "claire@client.example") is None
    assert verify_reply_address(b"k", DESK, address.replace("desk.", "evil."),
                                "claire@client.example") is None


def test_without_a_configured_key_one_is_made_once_and_kept_private(tmp_path: Path) -> None:
    settings = Settings(desk=DeskSettings(state_dir=tmp_path))
    first = load_reply_key(settings)
    assert len(first) == 64
    assert load_reply_key(settings) == first
    assert (tmp_path / "reply.key").stat().st_mode & 0o777 == 0o600
