"""Signed reply addresses: support+<token>@domain, the token an HMAC of ticket and recipient.

A reply sent to such an address proves that its author received maildesk's mail about that
ticket at that recipient address, which a forged From header alone cannot.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from maildesk.config import Settings

# 20 hex digits are 80 bits: enough that guessing is hopeless, short enough for a local part.
# Hex survives MTAs and clients that lowercase local parts.
_MAC_LENGTH = 20
_TOKEN = re.compile(rf"^t(\d+)-([0-9a-f]{{{_MAC_LENGTH}}})$")


def _mac(key: bytes, ticket_id: int, recipient: str) -> str:
    message = f"{ticket_id}:{recipient.strip().lower()}".encode()
    return hmac.new(key, message, sha256).hexdigest()[:_MAC_LENGTH]


def reply_address(key: bytes, desk_address: str, ticket_id: int, recipient: str) -> str:
    """The signed address that `recipient` should reply to about `ticket_id`."""
    local, _, domain = desk_address.rpartition("@")
    return f"{local}+t{ticket_id}-{_mac(key, ticket_id, recipient)}@{domain}"


@dataclass(frozen=True)
class SignedRecipient:
    """A desk address whose token names a ticket and is valid for the given sender."""

    ticket_id: int
    address: str


def verify_reply_address(
    key: bytes, desk_address: str, address: str, sender: str
) -> SignedRecipient | None:
    """The ticket that `address` was signed for, if it was signed for `sender`; else None."""
    local, _, domain = address.strip().lower().rpartition("@")
    desk_local, _, desk_domain = desk_address.lower().rpartition("@")
    base, plus, token = local.partition("+")
    if not plus or base != desk_local or domain != desk_domain:
        return None
    match = _TOKEN.match(token)
    if match is None:
        return None
    ticket_id = int(match.group(1))
    if not hmac.compare_digest(match.group(2), _mac(key, ticket_id, sender)):
        return None
    return SignedRecipient(ticket_id=ticket_id, address=address)


def load_reply_key(settings: Settings) -> bytes:
    """The configured reply key, else the one kept in state_dir/reply.key (made on first use)."""
    if settings.security.reply_key is not None:
        return settings.security.reply_key.get_secret_value().encode()
    path = settings.desk.state_dir / "reply.key"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    _write_private(path, key)
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
