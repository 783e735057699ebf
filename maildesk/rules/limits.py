"""Limits on automatic mail: how many one mailbox may get, and when a sender trips the breaker.

Every automatic mail (an acknowledgement, a notice, an answer to a stranger) is counted against
the recipient's normalised mailbox, so that case, quoting and plus-addressing cannot multiply
one person into many. The counts come from the store; the decisions are made here.
"""

from __future__ import annotations

from dataclasses import dataclass

from maildesk.config import LimitsSettings


def mailbox_key(address: str) -> str:
    """One key per mailbox: lowercased, unquoted, without a +subaddress."""
    local, _, domain = address.strip().rpartition("@")
    local = local.lower()
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        local = local[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    local = local.partition("+")[0]
    return f"{local}@{domain.lower().rstrip('.')}"


@dataclass(frozen=True)
class AutomaticCounts:
    """What the store counted for one automatic mail that is about to be sent."""

    to_mailbox_today: int  # automatic mails to this mailbox in the last 24 hours
    tickets_by_sender: int  # tickets this sender opened within the breaker's window
    stranger_answers_last_hour: int  # answers to strangers, all addresses, in the last hour


def automatic_refusal(
    counts: AutomaticCounts, limits: LimitsSettings, *, to_stranger: bool = False
) -> str | None:
    """Why no automatic mail may go now (the limit that holds it back), or None."""
    if counts.to_mailbox_today >= limits.automatic_per_mailbox_per_day:
        return f"daily limit of {limits.automatic_per_mailbox_per_day} automatic mails reached"
    if counts.tickets_by_sender > limits.breaker_tickets:
        return (
            f"breaker: over {limits.breaker_tickets} tickets in {limits.breaker_minutes} minutes"
        )
    if to_stranger and counts.stranger_answers_last_hour >= limits.stranger_answers_per_hour:
        return f"hourly cap of {limits.stranger_answers_per_hour} answers to strangers reached"
    return None
