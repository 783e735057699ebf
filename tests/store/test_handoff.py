"""The hand-over of claimed rows to an idle worker: when it accepts, and what it hands."""

from __future__ import annotations

from datetime import timedelta

from maildesk.store.handoff import Handoff
from maildesk.store.intake import INTAKE_QUEUE


def idle(**limits: int) -> Handoff[int]:
    """A hand-over whose worker waits for work."""
    handoff: Handoff[int] = Handoff(INTAKE_QUEUE, "test", timedelta(seconds=15), **limits)
    handoff.set_idle(True)
    return handoff


def test_only_an_idle_worker_accepts() -> None:
    """A busy worker claims by itself, in batches."""
    handoff = idle()
    handoff.set_idle(False)
    assert not handoff.accepting()
    handoff.set_idle(True)
    assert handoff.accepting()


def test_a_worker_with_work_waiting_accepts_no_more() -> None:
    """One hand-over at a time: what waits must be taken before the next is accepted."""
    handoff = idle()
    handoff.hand([3, 4])
    assert not handoff.accepting()
    assert handoff.take() == [3, 4]
    assert handoff.accepting()
    assert handoff.take() == []


def test_a_hand_over_holds_no_more_than_one_claim() -> None:
    """Rows beyond the claim's count, or its weight unless alone, are left to the claims."""
    handoff = idle(max_items=2, max_weight=100)
    assert handoff.accepting(2, 100)
    assert not handoff.accepting(3, 3)
    assert not handoff.accepting(2, 101)
    # A single row of any weight, as a claim always takes its first row.
    assert handoff.accepting(1, 10_000)
