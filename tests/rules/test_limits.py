"""Limits on automatic mail: one key per mailbox, and the limit that holds a mail back."""

from __future__ import annotations

import pytest

from maildesk.config import LimitsSettings
from maildesk.rules.limits import AutomaticCounts, automatic_refusal, mailbox_key

LIMITS = LimitsSettings(automatic_per_mailbox_per_day=20, breaker_tickets=10,
                        breaker_minutes=10, stranger_answers_per_hour=30)


@pytest.mark.parametrize(
    "address",
    ["claire@client.example", "Claire@Client.Example", "claire+1@client.example",
     "CLAIRE+support-19@client.example.", '"claire"@client.example', '"claire+x"@client.example'],
)
def test_variants_of_one_mailbox_share_a_key(address: str) -> None:
    assert mailbox_key(address) == "claire@client.example"


def test_different_mailboxes_keep_their_keys() -> None:
    assert mailbox_key("claire.d@client.example") == "claire.d@client.example"
    assert mailbox_key("claire@other.example") == "claire@other.example"


@pytest.mark.parametrize(
    ("counts", "to_stranger", "refusal"),
    [
        (AutomaticCounts(19, 0, 0), False, None),
        (AutomaticCounts(20, 0, 0), False, "daily limit of 20 automatic mails reached"),
        (AutomaticCounts(0, 10, 0), False, None),
        (AutomaticCounts(0, 11, 0), False, "breaker: over 10 tickets in 10 minutes"),
        (AutomaticCounts(0, 0, 30), False, None),
        (AutomaticCounts(0, 0, 29), True, None),
        (AutomaticCounts(0, 0, 30), True, "hourly cap of 30 answers to strangers reached"),
    ],
)
def test_the_limit_that_holds_a_mail_back(
    counts: AutomaticCounts, to_stranger: bool, refusal: str | None
) -> None:
    assert automatic_refusal(counts, LIMITS, to_stranger=to_stranger) == refusal
