"""core.hedging: when the batch the loop waits for is late enough to be made a second time (a fake clock)."""

from __future__ import annotations

import pytest

from prefetch.core.hedging import HEDGE_MARGIN_FACTOR, HEDGE_MIN_MARGIN_S, HEDGE_MIN_MEASURED, HEDGE_SHARE, Hedging


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def measured(times: list[float]) -> tuple[Hedging, Clock]:
    clock = Clock()
    hedging = Hedging(clock)
    for seconds in times:
        hedging.measured(seconds)
    return hedging, clock


def test_no_hedge_before_enough_batches_are_measured():
    hedging, clock = measured([0.01] * (HEDGE_MIN_MEASURED - 1))
    hedging.asked(0)
    clock.now += 1000.0
    assert hedging.margin() is None
    assert hedging.due() is None
    hedging.measured(0.01)
    assert hedging.due() == 0


def test_the_margin_is_the_median_batch_time_times_the_factor_and_ignores_stragglers():
    times = [0.010, 0.012, 0.011, 0.013, 0.009, 0.010, 0.011, 0.012, 0.5, 0.6]  # two stragglers
    hedging, _ = measured(times)
    median = sorted(times)[len(times) // 2]
    assert hedging.margin() == pytest.approx(HEDGE_MARGIN_FACTOR * median)
    tiny, _ = measured([1e-6] * HEDGE_MIN_MEASURED)
    assert tiny.margin() == HEDGE_MIN_MARGIN_S


def test_late_means_waited_longer_than_the_margin_since_the_loop_asked():
    hedging, clock = measured([0.01] * 16)
    margin = hedging.margin()
    assert margin is not None
    hedging.asked(5)
    asked_at = clock.now
    assert hedging.deadline() == pytest.approx(asked_at + margin)
    clock.now = asked_at + margin * 0.99
    assert hedging.due() is None
    hedging.asked(5)  # asking again for the same batch does not restart its clock
    clock.now = asked_at + margin
    assert hedging.due() == 5
    assert hedging.hedges == 1


def test_each_batch_is_hedged_once():
    hedging, clock = measured([0.01] * 16)
    hedging.asked(0)
    clock.now += 1.0
    assert hedging.due() == 0
    clock.now += 1.0
    assert hedging.due() is None
    assert hedging.deadline() is None
    assert hedging.hedges == 1


def test_hedges_are_capped_at_a_share_of_the_batches_asked_for():
    hedging, clock = measured([0.01] * 16)
    for batch in range(400):
        hedging.asked(batch)
        clock.now += 1.0  # every batch is late
        hedging.due()
        assert hedging.hedges <= 1 + HEDGE_SHARE * (batch + 1)
    assert hedging.hedges >= HEDGE_SHARE * 400  # the cap, not something stricter, is what held


def test_a_change_of_pace_moves_the_margin():
    hedging, _ = measured([0.01] * 64)
    before = hedging.margin()
    for _ in range(64):
        hedging.measured(0.1)
    assert before is not None and hedging.margin() == pytest.approx(10 * before)
