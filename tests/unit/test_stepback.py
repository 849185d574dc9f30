"""``worker_nice="auto"``: the workers step back only when the loop is measured compute-bound (``_stepback``).

The decision on a fake clock and fake waits, without processes; that a running worker's nice value really
changes, and that a replacement gets it too, in tests/engine/test_stepback_engine.py.
"""

from __future__ import annotations

import pytest

from prefetch import _stepback
from prefetch._stepback import (
    COMPUTE_BOUND_WAIT_SHARE,
    DATA_BOUND_WAIT_SHARE,
    NICE_SPAN_BATCHES,
    NICE_WARMUP_BATCHES,
    StepBack,
)

STEP_S = 0.1  # each batch of the fake loop takes this long, waiting included
FIRST_DECISION = NICE_WARMUP_BATCHES + NICE_SPAN_BATCHES  # the tick at which the first span ends


class FakeLoop:
    """The loop as ``StepBack`` sees it: a clock, the seconds waited so far, the workers and their nice."""

    def __init__(self, monkeypatch, pids=(101, 102), may_lower: bool = True):
        self.now = 0.0
        self.waited = 0.0
        self.workers = list(pids)
        self.nice = {pid: 0 for pid in pids}
        self.may_lower = may_lower
        monkeypatch.setattr(_stepback.time, "perf_counter", lambda: self.now)
        self.stepback = StepBack(10, lambda: list(self.workers), self.renice, base=0)
        self.changes: list[int] = []  # the ticks at which tick() said it changed the priority

    def renice(self, pid: int, nice: int) -> None:
        if nice < self.nice.get(pid, 0) and not self.may_lower:
            raise PermissionError(13, "Permission denied")
        self.nice[pid] = nice

    def run(self, batches: int, wait_share: float) -> None:
        """``batches`` batches, each spending ``wait_share`` of its time waiting for data."""
        for _ in range(batches):
            if self.stepback.tick(self.waited):
                self.changes.append(self.stepback.batches)
            self.now += STEP_S
            self.waited += STEP_S * wait_share


def test_a_compute_bound_loop_steps_the_workers_back(monkeypatch):
    loop = FakeLoop(monkeypatch)
    loop.run(FIRST_DECISION - 1, wait_share=COMPUTE_BOUND_WAIT_SHARE / 2)
    assert loop.nice == {101: 0, 102: 0}  # level until the first span is measured
    loop.run(1, wait_share=COMPUTE_BOUND_WAIT_SHARE / 2)
    assert loop.nice == {101: 10, 102: 10} and loop.changes == [FIRST_DECISION]
    assert loop.stepback.decision.startswith("workers stepped back to nice +10: the loop waited for data 5%")


def test_a_data_bound_loop_keeps_the_workers_level(monkeypatch):
    loop = FakeLoop(monkeypatch)
    loop.run(FIRST_DECISION + 5 * NICE_SPAN_BATCHES, wait_share=COMPUTE_BOUND_WAIT_SHARE * 2)
    assert loop.nice == {101: 0, 102: 0} and loop.changes == []
    assert loop.stepback.decision.startswith("workers level with the training step (nice +0): the loop waited")
    assert "20%" in loop.stepback.decision


def test_the_warm_up_does_not_count(monkeypatch):
    """The loop waits for its first batches whatever the workers' priority: the first span starts after them."""
    loop = FakeLoop(monkeypatch)
    loop.run(NICE_WARMUP_BATCHES, wait_share=1.0)
    loop.run(NICE_SPAN_BATCHES, wait_share=0.0)
    assert loop.nice == {101: 10, 102: 10}


def test_a_replacement_worker_steps_back_too(monkeypatch):
    loop = FakeLoop(monkeypatch)
    loop.run(FIRST_DECISION, wait_share=0.0)
    loop.workers = [102, 103]  # 101 died and was replaced
    loop.nice[103] = 0
    loop.run(NICE_SPAN_BATCHES, wait_share=0.0)
    assert loop.nice[103] == 10 and loop.changes == [FIRST_DECISION]  # no new decision: the same one, applied


def test_workers_that_fell_behind_come_back_and_stay_level(monkeypatch):
    loop = FakeLoop(monkeypatch)
    loop.run(FIRST_DECISION, wait_share=0.0)
    loop.run(NICE_SPAN_BATCHES, wait_share=DATA_BOUND_WAIT_SHARE * 2)  # stepped back, the loop now waits
    assert loop.nice == {101: 0, 102: 0}
    assert loop.changes == [FIRST_DECISION, FIRST_DECISION + NICE_SPAN_BATCHES]
    assert loop.stepback.decision.startswith("workers back level with the training step")
    loop.run(5 * NICE_SPAN_BATCHES, wait_share=0.0)  # compute-bound again: no second step back (no flip-flop)
    assert loop.nice == {101: 0, 102: 0} and len(loop.changes) == 2


def test_without_the_privilege_to_come_back_it_says_so(monkeypatch):
    loop = FakeLoop(monkeypatch, may_lower=False)
    loop.run(FIRST_DECISION, wait_share=0.0)
    loop.run(NICE_SPAN_BATCHES, wait_share=DATA_BOUND_WAIT_SHARE * 2)
    assert loop.nice == {101: 10, 102: 10} and loop.changes == [FIRST_DECISION]
    decision = loop.stepback.decision
    assert decision.startswith("workers stay at nice +10") and "needs privilege" in decision
    assert "worker_nice=0" in decision


@pytest.mark.parametrize("share", [0.0, COMPUTE_BOUND_WAIT_SHARE * 0.9])
def test_a_loop_between_the_thresholds_keeps_the_workers_back(monkeypatch, share):
    loop = FakeLoop(monkeypatch)
    loop.run(FIRST_DECISION, wait_share=share)
    loop.run(5 * NICE_SPAN_BATCHES, wait_share=(COMPUTE_BOUND_WAIT_SHARE + DATA_BOUND_WAIT_SHARE) / 2)
    assert loop.nice == {101: 10, 102: 10} and loop.changes == [FIRST_DECISION]
