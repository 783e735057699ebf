"""Information of the people whose accounts their company asked for (GDPR Art. 13 and 14).

The CLI calls `welcome` in the transaction that creates accounts, so that a person's account
and the mail that tells them about it are committed together.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

from sqlmodel import Session

from maildesk.config import Settings
from maildesk.outbound.notify import Notifier
from maildesk.outbound.welcome import queue_welcome
from maildesk.signing import ReplyKey, ReplyKeyring
from maildesk.store.models import Account, Outbox


def unsigned_notifier(settings: Settings) -> Notifier:
    """A Notifier for mails that carry no reply address (welcomes, mails to the DPO).

    It holds a random key that nothing verifies rather than the desk's reply key: a command run
    by another user than the daemon must neither read that key nor create its file.
    """
    return Notifier(settings, ReplyKeyring(ReplyKey("unused", secrets.token_bytes(32))))


def welcome(session: Session, settings: Settings, accounts: Iterable[Account]) -> list[Outbox]:
    """Queue the welcome with the full notice to each of `accounts` that has not had it."""
    notifier = unsigned_notifier(settings)
    return [queue_welcome(session, notifier, account)
            for account in accounts if account.notice_sent_at is None]
