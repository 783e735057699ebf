"""Classify: what kind of mail this is, and who sent it.

Two questions, each answered by a small table of named rules in the style of GNU Mailman's
chains: is the mail automatic (an auto-reply, a bounce, list traffic), which must never get an
automatic answer; and who is the sender (an agent, an active account, a deactivated account, a
stranger). The rule that matched is recorded as the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from maildesk.mail.message import Delivery, ParsedMail


@dataclass(frozen=True)
class Rule:
    """A named check on a mail; `check` returns True when the rule matches."""

    name: str
    description: str
    check: Callable[[ParsedMail, Delivery], bool]


def _header(mail: ParsedMail, name: str) -> str:
    return str(mail.message.get(name, "") or "").strip()


def _auto_submitted(mail: ParsedMail, _d: Delivery) -> bool:
    value = _header(mail, "Auto-Submitted").lower()
    return bool(value) and value.split(";")[0].strip() != "no"


def _precedence(mail: ParsedMail, _d: Delivery) -> bool:
    return _header(mail, "Precedence").lower() in {"bulk", "junk", "list"}


def _list_mail(mail: ParsedMail, _d: Delivery) -> bool:
    return bool(_header(mail, "List-Id") or _header(mail, "List-Unsubscribe"))


def _null_return_path(mail: ParsedMail, delivery: Delivery) -> bool:
    if delivery.envelope_from is not None and delivery.source != "imap":
        return delivery.envelope_from.strip() in {"", "<>"}
    return "Return-Path" in mail.message and _header(mail, "Return-Path") in {"", "<>"}


def _report(mail: ParsedMail, _d: Delivery) -> bool:
    return mail.message.get_content_type() == "multipart/report"


# Clients that predate RFC 3834 still mark their vacation replies with headers of their own.
_VENDOR_AUTOREPLY_HEADERS = ("X-Autoreply", "X-Autorespond", "X-Autoresponse", "X-Vacation")
_DAEMON_SENDERS = re.compile(r"^(mailer-daemon|postmaster|noreply|no-reply|do-not-reply)@", re.I)


def _vendor_autoreply(mail: ParsedMail, _d: Delivery) -> bool:
    return any(_header(mail, name) for name in _VENDOR_AUTOREPLY_HEADERS)


def _daemon_sender(mail: ParsedMail, _d: Delivery) -> bool:
    return bool(_DAEMON_SENDERS.match(mail.from_address))


AUTOMATIC_RULES: tuple[Rule, ...] = (
    Rule("auto-submitted", "Auto-Submitted says the mail was not written by a person",
         _auto_submitted),
    Rule("precedence", "Precedence: bulk, junk or list", _precedence),
    Rule("list", "mailing-list traffic (List-Id or List-Unsubscribe)", _list_mail),
    Rule("null-return-path", "an empty Return-Path: a bounce or an auto-reply", _null_return_path),
    Rule("report", "a delivery or disposition report (multipart/report)", _report),
    Rule("vendor-autoreply", "a vacation header of a pre-RFC 3834 client", _vendor_autoreply),
    Rule("daemon-sender", "sent by a mailer daemon or a no-reply address", _daemon_sender),
)


def automatic_reason(mail: ParsedMail, delivery: Delivery) -> str | None:
    """The name of the first rule saying the mail is automatic, or None for a person's mail."""
    for rule in AUTOMATIC_RULES:
        if rule.check(mail, delivery):
            return rule.name
    return None


@dataclass(frozen=True)
class DirectoryEntry:
    """What the directory holds for a From address, as plain values that the store looked up."""

    agent_id: int | None = None  # An active agent with this address.
    account_id: int | None = None
    company_id: int | None = None
    # The account may open tickets on the day: not deactivated, and its company active.
    account_active: bool = False


@dataclass(frozen=True)
class Sender:
    """Who sent a mail, as the directory knows them."""

    kind: str  # "agent", "account", "deactivated" or "unknown"
    address: str
    account_id: int | None = None
    company_id: int | None = None
    agent_id: int | None = None


def identify_sender(address: str, entry: DirectoryEntry) -> Sender:
    """Decide who the From address is: an active agent first, then an account, else unknown."""
    address = address.lower()
    if entry.agent_id is not None:
        return Sender("agent", address, agent_id=entry.agent_id)
    if entry.account_id is None:
        return Sender("unknown", address)
    kind = "account" if entry.account_active else "deactivated"
    return Sender(kind, address, entry.account_id, entry.company_id)


def authentication_failure(mail: ParsedMail, trusted_authserv_id: str | None) -> str | None:
    """Why the sender is not proven by the trusted MTA's Authentication-Results, if it is not.

    Without a configured authserv-id there is nobody to trust, and every sender is taken at
    their word; the signed reply address still guards every agent action.
    """
    if not trusted_authserv_id:
        return None
    domain = mail.from_address.rpartition("@")[2].lower()
    for value in mail.message.get_all("Authentication-Results", []) or []:
        text = str(value)
        authserv, _, results = text.partition(";")
        if authserv.strip().split()[0:1] != [trusted_authserv_id]:
            continue
        lowered = results.lower()
        if "dmarc=pass" in lowered:
            return None
        for match in re.finditer(r"dkim=pass[^;]*header\.d=([^\s;]+)", lowered):
            if match.group(1).strip() == domain:
                return None
        if re.search(r"spf=pass[^;]*smtp\.mailfrom=[^\s;]*@" + re.escape(domain), lowered):
            return None
        return "sender not authenticated (no DMARC, aligned DKIM or SPF pass)"
    return f"no Authentication-Results from {trusted_authserv_id}"
