"""The EU desk's office hours, for the option that gives US agents only the tickets that arrive
outside them (`[tickets] us_agents = "outside_office_hours"`).

This is routing, not the privacy rule: a US agent never sees a company without after-hours
support whatever the hour (store/directory.agents_for and the sender hold that). Within the
subscription, the option keeps the US team for the hours when Europe is away.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time
from typing import Literal
from zoneinfo import ZoneInfo

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


@dataclass(frozen=True)
class OfficeHours:
    """When the EU desk is at work: a daily span on some weekdays, in the desk's time zone."""

    opens: time
    closes: time
    days: frozenset[int]  # Monday is 0, as datetime.weekday() counts.
    timezone: str

    @classmethod
    def of(cls, opens: time, closes: time, days: list[Weekday], timezone: str) -> OfficeHours:
        """Office hours from the config's values: day names such as "mon" and a zone name."""
        return cls(opens, closes, frozenset(DAY_NAMES.index(day) for day in days), timezone)

    def is_open(self, moment: datetime) -> bool:
        """Whether `moment` (timezone-aware) falls within the office hours."""
        local = moment.astimezone(ZoneInfo(self.timezone))
        return local.weekday() in self.days and self.opens <= local.time() < self.closes
