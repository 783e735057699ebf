"""Signed reply addresses: support+t<ticket>-<key id>-<token>@domain.

The token is an HMAC-SHA256, cut to 96 bits, over the ticket, the ticket's reply epoch, the
person the mail went to (an agent or an account, by id, never by mail address) and the key id.
A reply sent to such an address proves that its author received maildesk's mail about that
ticket, which a forged From header alone cannot. Keys rotate: the first configured key signs,
older ones are still accepted until their date; bumping a ticket's reply epoch revokes every
address issued for it.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from hashlib import sha256
from pathlib import Path

from maildesk.config import Settings

# 24 hex digits are 96 bits: guessing is hopeless, and the local part stays short. Hex
# survives MTAs and clients that lowercase local parts.
MAC_HEX_DIGITS = 24
# The key id of a key given alone (reply_key, MAILDESK_REPLY_KEY or state_dir/reply.key).
SINGLE_KEY_ID = "a"
_TOKEN = re.compile(rf"t(\d{{1,12}})-([a-z0-9]{{1,8}})-([0-9a-f]{{{MAC_HEX_DIGITS}}})")


@dataclass(frozen=True)
class ReplyKey:
    """One signing key; `accept_until` is the last day a retired key is still accepted."""

    id: str
    secret: bytes
    accept_until: date | None = None


@dataclass(frozen=True)
class ReplyKeyring:
    """The key that signs new reply addresses, and the retired ones still accepted."""

    current: ReplyKey
    retired: tuple[ReplyKey, ...] = ()

    def accepted(self, key_id: str, today: date) -> ReplyKey | None:
        """The key with that id, if it may still verify a reply on `today`."""
        if key_id == self.current.id:
            return self.current
        for key in self.retired:
            if key.id == key_id and key.accept_until is not None and today <= key.accept_until:
                return key
        return None


@dataclass(frozen=True)
class ReplyToken:
    """What a desk address with a token says, before anyone checked it."""

    ticket_id: int
    key_id: str
    mac: str


def principal_of_agent(agent_id: int) -> str:
    """Whom an agent's reply addresses are bound to."""
    return f"agent:{agent_id}"


def principal_of_account(account_id: int) -> str:
    """Whom a customer's reply addresses are bound to."""
    return f"account:{account_id}"


def _mac(key: ReplyKey, ticket_id: int, epoch: int, principal: str) -> str:
    message = f"maildesk-reply|{key.id}|{ticket_id}|{epoch}|{principal}".encode()
    return hmac.new(key.secret, message, sha256).hexdigest()[:MAC_HEX_DIGITS]


def reply_address(
    keys: ReplyKeyring, desk_address: str, ticket_id: int, principal: str, epoch: int = 0
) -> str:
    """The signed address that `principal` should reply to about `ticket_id`."""
    local, _, domain = desk_address.rpartition("@")
    mac = _mac(keys.current, ticket_id, epoch, principal)
    return f"{local}+t{ticket_id}-{keys.current.id}-{mac}@{domain}"


def read_reply_address(desk_address: str, address: str) -> ReplyToken | None:
    """The token in a desk address, if it has one of the right shape (nothing is verified)."""
    local, _, domain = address.strip().lower().rpartition("@")
    desk_local, _, desk_domain = desk_address.lower().rpartition("@")
    base, plus, token = local.partition("+")
    if not plus or base != desk_local or domain != desk_domain:
        return None
    match = _TOKEN.fullmatch(token)
    if match is None:
        return None
    return ReplyToken(int(match.group(1)), match.group(2), match.group(3))


def verify_reply_token(
    keys: ReplyKeyring, token: ReplyToken, *, principal: str, epoch: int, today: date
) -> bool:
    """Whether the token was signed for this principal, ticket and epoch with an accepted key."""
    key = keys.accepted(token.key_id, today)
    if key is None:
        return False
    return hmac.compare_digest(token.mac, _mac(key, token.ticket_id, epoch, principal))


# Given a function that makes a new key, the desk's key as kept where every instance reads it
# (the database: see store/shared.py); signing itself stays free of any store.
SharedKey = Callable[[Callable[[], str]], str]


def load_reply_keys(settings: Settings, shared_key: SharedKey | None = None) -> ReplyKeyring:
    """The configured keyring, else the desk's single key: the shared one when `shared_key`
    is given (made at first use, or taken over from an older state_dir/reply.key), else the
    one kept in state_dir/reply.key.
    """
    security = settings.security
    if security.reply_keys:
        first, *older = security.reply_keys
        return ReplyKeyring(
            current=ReplyKey(first.id, _secret(first.key)),
            retired=tuple(ReplyKey(k.id, _secret(k.key), k.accept_until) for k in older),
        )
    if security.reply_key is not None:
        return ReplyKeyring(ReplyKey(SINGLE_KEY_ID, security.reply_key.get_secret_value().encode()))
    if shared_key is not None:
        legacy = settings.desk.state_dir / "reply.key"

        def make() -> str:
            # Reply addresses issued before the key moved to the database keep working.
            if legacy.exists():
                return legacy.read_bytes().strip().decode()
            return secrets.token_hex(32)

        return ReplyKeyring(ReplyKey(SINGLE_KEY_ID, shared_key(make).encode()))
    return ReplyKeyring(ReplyKey(SINGLE_KEY_ID, _state_key(settings.desk.state_dir)))


def _secret(value: object) -> bytes:
    get = getattr(value, "get_secret_value", None)
    return (get() if get is not None else str(value)).encode()


def _state_key(state_dir: Path) -> bytes:
    path = state_dir / "reply.key"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, secrets.token_hex(32).encode())
    # Another instance may have won the race to create it; the file on disk is the key.
    return path.read_bytes().strip()


def _write_private(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
