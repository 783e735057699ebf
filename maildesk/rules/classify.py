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


def _precedence_auto_reply(mail: ParsedMail, _d: Delivery) -> bool:
    return _header(mail, "Precedence").lower() == "auto_reply"


def _list_mail(mail: ParsedMail, _d: Delivery) -> bool:
    return any(_header(mail, name) for name in ("List-Id", "List-Unsubscribe", "List-Post"))


def _null_return_path(mail: ParsedMail, delivery: Delivery) -> bool:
    if delivery.envelope_from is not None and delivery.source != "imap":
        return delivery.envelope_from.strip() in {"", "<>"}
    return "Return-Path" in mail.message and _header(mail, "Return-Path") in {"", "<>"}


def _report(mail: ParsedMail, _d: Delivery) -> bool:
    return mail.message.get_content_type() == "multipart/report"


# Every mail maildesk sends carries this header; seeing it come back means a loop.
LOOP_HEADER = "X-Maildesk-Loop"


def _loop_header(mail: ParsedMail, _d: Delivery) -> bool:
    return LOOP_HEADER in mail.message or "X-Loop" in mail.message


# maildesk's own Message-IDs: make_msgid(idstring="maildesk"), so a mail of ours that comes
# back is told from a person's mail that merely shares the domain.
_OWN_MESSAGE_ID = re.compile(r"^<\d+\.\d+\.\d+\.maildesk@([^>]+)>$")


def own_message_id_domain(mail: ParsedMail) -> str | None:
    """The domain of a Message-ID that maildesk made, if the mail carries one."""
    match = _OWN_MESSAGE_ID.match(mail.message_id or "")
    return match.group(1).lower() if match else None


def _own_message_id(mail: ParsedMail, _d: Delivery) -> bool:
    return own_message_id_domain(mail) is not None


# Clients that predate RFC 3834 still mark their vacation replies with headers of their own.
_VENDOR_AUTOREPLY_HEADERS = ("X-Autoreply", "X-Autorespond", "X-Autoresponse", "X-Vacation")
_DAEMON_SENDERS = re.compile(r"^(mailer-daemon|postmaster)@", re.I)
# noreply@, no-reply@, no_reply@, donotreply@, do-not-reply@, noreply-xyz@, bounce@, bounces+…@
_NOREPLY_SENDERS = re.compile(
    r"^(no[-_.]?reply|do[-_.]?not[-_.]?reply|bounces?)([-_.+][^@]*)?@", re.I
)


def _vendor_autoreply(mail: ParsedMail, _d: Delivery) -> bool:
    return any(_header(mail, name) for name in _VENDOR_AUTOREPLY_HEADERS)


def _daemon_sender(mail: ParsedMail, _d: Delivery) -> bool:
    return bool(_DAEMON_SENDERS.match(mail.from_address))


def _noreply_sender(mail: ParsedMail, _d: Delivery) -> bool:
    return bool(_NOREPLY_SENDERS.match(mail.from_address))


AUTOMATIC_RULES: tuple[Rule, ...] = (
    Rule("loop", "our own loop header, or an X-Loop header, came back", _loop_header),
    Rule("own-message-id", "a Message-ID that maildesk made came back", _own_message_id),
    Rule("auto-submitted", "Auto-Submitted says the mail was not written by a person",
         _auto_submitted),
    Rule("precedence", "Precedence: bulk, junk or list", _precedence),
    Rule("precedence-auto-reply", "Precedence: auto_reply", _precedence_auto_reply),
    Rule("list", "mailing-list traffic (List-Id, List-Unsubscribe or List-Post)", _list_mail),
    Rule("null-return-path", "an empty Return-Path: a bounce or an auto-reply", _null_return_path),
    Rule("report", "a delivery or disposition report (multipart/report)", _report),
    Rule("vendor-autoreply", "a vacation header of a pre-RFC 3834 client", _vendor_autoreply),
    Rule("daemon-sender", "sent by a mailer daemon or a postmaster", _daemon_sender),
    Rule("noreply-sender", "sent from a no-reply address: a machine's mail", _noreply_sender),
)

# Automatic replies to a mail (out-of-office and the like) and our own mail coming back are kept
# quietly; the others come from machines (lists, no-reply senders, reports) and go to quarantine
# for the agents, so that no machine's mail (a sign-up code, say) ever opens a ticket.
QUIET_RULES = frozenset({
    "loop", "own-message-id", "auto-submitted", "precedence-auto-reply", "vendor-autoreply",
    "null-return-path",
})

# X-Auto-Response-Suppress (Microsoft): a person wrote the mail, but asks for no automatic reply.
_SUPPRESS = {"all", "autoreply", "oof"}


def suppresses_auto_reply(mail: ParsedMail) -> bool:
    """Whether the sender asked for no automatic reply (X-Auto-Response-Suppress)."""
    values = {v.strip().lower() for v in _header(mail, "X-Auto-Response-Suppress").split(",")}
    return bool(values & _SUPPRESS)


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
