"""The EU desk's office hours: the days, the span, the time zone and its summer time."""

from __future__ import annotations

from datetime import UTC, datetime, time

import pytest

from maildesk.rules.office_hours import OfficeHours

PARIS = OfficeHours.of(time(9), time(18), ["mon", "tue", "wed", "thu", "fri"], "Europe/Paris")


@pytest.mark.parametrize(("moment", "open_"), [
    # Monday 7 December 2026, winter: Paris is UTC+1.
    (datetime(2026, 12, 7, 8, 0, tzinfo=UTC), True),     # 09:00 in Paris: opens
    (datetime(2026, 12, 7, 7, 59, tzinfo=UTC), False),   # 08:59
    (datetime(2026, 12, 7, 16, 59, tzinfo=UTC), True),   # 17:59
    (datetime(2026, 12, 7, 17, 0, tzinfo=UTC), False),   # 18:00: closed from then on
    (datetime(2026, 12, 5, 10, 0, tzinfo=UTC), False),   # a Saturday
    (datetime(2026, 12, 6, 10, 0, tzinfo=UTC), False),   # a Sunday
    # Monday 29 March 2027, summer: Paris is UTC+2, so 07:30 UTC is 09:30 there.
    (datetime(2027, 3, 29, 7, 30, tzinfo=UTC), True),
    (datetime(2027, 3, 29, 16, 30, tzinfo=UTC), False),  # 18:30 in Paris
    # Friday 23:30 UTC is already Saturday in Paris.
    (datetime(2026, 12, 11, 23, 30, tzinfo=UTC), False),
])  # fmt: skip
def test_office_hours_are_read_in_the_desks_time_zone(moment: datetime, open_: bool) -> None:
    assert PARIS.is_open(moment) is open_


def test_only_the_days_given_are_days_at_work() -> None:
    weekend_desk = OfficeHours.of(time(10), time(12), ["sat"], "UTC")
    assert weekend_desk.is_open(datetime(2026, 12, 5, 11, 0, tzinfo=UTC))
    assert not weekend_desk.is_open(datetime(2026, 12, 7, 11, 0, tzinfo=UTC))
