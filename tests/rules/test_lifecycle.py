"""The ticket's clock as pure rules: what a customer's reply does, and when a ticket closes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from maildesk.rules.lifecycle import after_customer_reply, closing_due

CHANGED = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)


@pytest.mark.parametrize("status", ["open", "pending"])
def test_a_reply_to_a_live_ticket_joins_it_whenever_it_comes(status: str) -> None:
    assert after_customer_reply(status, CHANGED, CHANGED + timedelta(days=400), 14) == "add"


@pytest.mark.parametrize(
    ("status", "after", "effect"),
    [
        ("solved", timedelta(0), "reopen"),
        ("solved", timedelta(days=14), "reopen"),
        ("solved", timedelta(days=14) + SECOND, "new"),
        ("closed", timedelta(days=13, hours=23), "reopen"),
        ("closed", timedelta(days=14), "reopen"),
        ("closed", timedelta(days=14) + SECOND, "new"),
        ("closed", timedelta(days=90), "new"),
    ],
)
def test_a_reply_to_a_finished_ticket_reopens_it_within_reopen_days(
    status: str, after: timedelta, effect: str
) -> None:
    assert after_customer_reply(status, CHANGED, CHANGED + after, 14) == effect


def test_reopen_days_comes_from_the_setting() -> None:
    assert after_customer_reply("closed", CHANGED, CHANGED + timedelta(days=2), 1) == "new"
    assert after_customer_reply("closed", CHANGED, CHANGED + timedelta(days=2), 2) == "reopen"


def test_a_finished_ticket_with_no_recorded_change_reopens() -> None:
    assert after_customer_reply("closed", None, CHANGED, 14) == "reopen"


@pytest.mark.parametrize(
    ("status", "after", "due"),
    [
        ("pending", timedelta(days=7) - SECOND, False),
        ("pending", timedelta(days=6, hours=23), False),
        ("pending", timedelta(days=7), True),
        ("pending", timedelta(days=7) + SECOND, True),
        ("solved", timedelta(days=3) - SECOND, False),
        ("solved", timedelta(days=3), True),
        ("open", timedelta(days=365), False),
        ("closed", timedelta(days=365), False),
    ],
)
def test_a_waiting_ticket_closes_once_its_days_are_over(
    status: str, after: timedelta, due: bool
) -> None:
    assert closing_due(status, CHANGED, CHANGED + after, pending_close_days=7,
                       solved_close_days=3) is due


def test_a_ticket_with_no_recorded_change_never_closes_itself() -> None:
    assert closing_due("pending", None, CHANGED, pending_close_days=7,
                       solved_close_days=3) is False
