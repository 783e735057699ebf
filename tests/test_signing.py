"""Signed reply addresses: bound to a ticket, a person and an epoch; keys rotate."""

from __future__ import annotations

import random
from datetime import date
from pathlib import Path

import pytest

from maildesk.config import DeskSettings, SecuritySettings, Settings
from maildesk.signing import (
    MAC_HEX_DIGITS,
    ReplyKey,
    ReplyKeyring,
    load_reply_keys,
    read_reply_address,
    reply_address,
    verify_reply_token,
)

DESK = "support@desk.example"
TODAY = date(2026, 12, 2)
KEYS = ReplyKeyring(ReplyKey("a", b"k"))
CLAIRE = "account:7"


def verified(keys: ReplyKeyring, address: str, principal: str, *, epoch: int = 0,
             today: date = TODAY) -> int | None:
    token = read_reply_address(DESK, address)
    if token is None or not verify_reply_token(keys, token, principal=principal, epoch=epoch,
                                               today=today):
        return None
    return token.ticket_id


def test_a_reply_address_is_valid_for_its_ticket_and_principal_only() -> None:
    address = reply_address(KEYS, DESK, 42, CLAIRE)
    assert address.startswith("support+t42-a-") and address.endswith("@desk.example")
    assert MAC_HEX_DIGITS * 4 >= 96
    assert verified(KEYS, address.upper(), CLAIRE) == 42
    assert verified(KEYS, address, "account:8") is None
    assert verified(KEYS, address, "agent:7") is None
    assert verified(ReplyKeyring(ReplyKey("a", b"other")), address, CLAIRE) is None
    assert verified(KEYS, address.replace("t42-", "t43-"), CLAIRE) is None
    assert read_reply_address(DESK, "support@desk.example") is None
    assert read_reply_address(DESK, address.replace("desk.", "evil.")) is None


@pytest.mark.parametrize("position", range(0, MAC_HEX_DIGITS))
def test_a_token_tampered_in_any_digit_fails(position: int) -> None:
    address = reply_address(KEYS, DESK, 42, CLAIRE)
    local, _, domain = address.partition("@")
    digit = local[-MAC_HEX_DIGITS + position]
    swapped = "0" if digit != "0" else "1"
    chars = list(local)
    chars[len(local) - MAC_HEX_DIGITS + position] = swapped
    assert verified(KEYS, "".join(chars) + "@" + domain, CLAIRE) is None


def test_100000_random_tokens_verify_for_nobody() -> None:
    rng = random.Random(4711)
    accepted = 0
    for _ in range(100_000):
        mac = f"{rng.getrandbits(MAC_HEX_DIGITS * 4):0{MAC_HEX_DIGITS}x}"
        address = f"support+t{rng.randint(1, 50)}-a-{mac}@desk.example"
        assert read_reply_address(DESK, address) is not None
        accepted += verified(KEYS, address, CLAIRE) is not None
    assert accepted == 0


def test_raising_the_epoch_revokes_the_addresses_issued_before() -> None:
    old = reply_address(KEYS, DESK, 42, CLAIRE, epoch=0)
    new = reply_address(KEYS, DESK, 42, CLAIRE, epoch=1)
    assert verified(KEYS, old, CLAIRE, epoch=1) is None
    assert verified(KEYS, new, CLAIRE, epoch=1) == 42


def test_a_retired_key_verifies_until_its_date_and_never_signs() -> None:
    before = ReplyKeyring(ReplyKey("k1", b"old"))
    after = ReplyKeyring(ReplyKey("k2", b"new"), (ReplyKey("k1", b"old", date(2026, 12, 31)),))
    issued = reply_address(before, DESK, 5, CLAIRE)
    assert verified(after, issued, CLAIRE, today=date(2026, 12, 31)) == 5
    assert verified(after, issued, CLAIRE, today=date(2027, 1, 1)) is None
    assert "-k2-" in reply_address(after, DESK, 5, CLAIRE)
    # A key id that the keyring does not know verifies nothing, whatever its MAC.
    assert verified(ReplyKeyring(ReplyKey("k2", b"old")), issued, CLAIRE) is None


def test_the_configured_keys_make_the_keyring() -> None:
    security = SecuritySettings.model_validate({"reply_keys": [
        {"id": "k2", "key": "new"}, {"id": "k1", "key": "old", "accept_until": date(2027, 1, 31)},
    ]})
    keys = load_reply_keys(Settings(security=security))
    assert keys.current == ReplyKey("k2", b"new")
    assert keys.retired == (ReplyKey("k1", b"old", date(2027, 1, 31)),)


def test_without_a_configured_key_one_is_made_once_and_kept_private(tmp_path: Path) -> None:
    settings = Settings(desk=DeskSettings(state_dir=tmp_path))
    first = load_reply_keys(settings)
    assert len(first.current.secret) == 64
    assert load_reply_keys(settings) == first
    assert (tmp_path / "reply.key").stat().st_mode & 0o777 == 0o600
