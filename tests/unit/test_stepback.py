"""``worker_nice="auto"``: the workers step back only when the loop is measured compute-bound (``StepBack``,
without the privilege to come back level), or when the loop's rate says so (``NiceTrial``, with it).

The decisions on a fake clock and fake waits, without processes; that a running worker's nice value really
changes, and that a replacement gets it too, in tests/engine/test_stepback_engine.py.
"""

from __future__ import annotations

import pytest

from prefetch import _compare, _stepback
from prefetch._stepback import (
    COMPUTE_BOUND_WAIT_SHARE,
    DATA_BOUND_WAIT_SHARE,
    NICE_MAX_BLOCKS,
    NICE_MIN_BLOCKS,
    NICE_MIN_GAIN,
    NICE_RECHECK_MAX_BATCHES,
    NICE_SPAN_BATCHES,
    NICE_WARMUP_BATCHES,
    NICE_WINDOW_BATCHES,
    NiceTrial,
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
            if self.stepback.tick(0, self.waited):
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


# --- NiceTrial: where the workers may come back level, the loop's rate decides -------------------------------

TRIAL_BLOCK_BATCHES = 4 * NICE_WINDOW_BATCHES  # A B B A
TRIAL_DECIDED = NICE_WARMUP_BATCHES + NICE_MIN_BLOCKS * TRIAL_BLOCK_BATCHES  # the tick of the first verdict


class FakeTrialLoop(FakeLoop):
    """The loop as ``NiceTrial`` sees it: each batch takes what ``cycle_s(level)`` says (``level``: every
    worker at the loop's nice), on the fake clock ``_compare.Trial`` reads."""

    def __init__(self, monkeypatch, cycle_s, may_lower: bool = True):
        super().__init__(monkeypatch, may_lower=may_lower)
        monkeypatch.setattr(_compare.time, "perf_counter", lambda: self.now)
        self.cycle_s = cycle_s
        self.trial = NiceTrial(10, lambda: list(self.workers), self.renice, base=0)
        self.calls: list[tuple[int, int]] = []  # (pid, nice) in the order set

    def renice(self, pid: int, nice: int) -> None:
        super().renice(pid, nice)
        self.calls.append((pid, nice))

    def level(self) -> bool:
        return all(self.nice[pid] == 0 for pid in self.workers)

    def run_trial(self, batches: int) -> None:
        for _ in range(batches):
            if self.trial.tick(3, 0.0):
                self.changes.append(self.trial.trial.batches)
            self.now += self.cycle_s(self.level())


def test_the_trial_times_both_priorities_in_balanced_blocks(monkeypatch):
    loop = FakeTrialLoop(monkeypatch, lambda level: 0.1)
    loop.run_trial(NICE_WARMUP_BATCHES - 1)
    assert loop.calls == []  # nothing touched during the warm-up
    seen = []
    for _ in range(TRIAL_BLOCK_BATCHES):
        loop.run_trial(1)
        seen.append(loop.level())
    windows = seen[::NICE_WINDOW_BATCHES]
    assert windows == [False, True, True, False], seen  # stepped back, level, level, stepped back


def test_a_loop_faster_with_the_workers_level_keeps_them_level(monkeypatch):
    loop = FakeTrialLoop(monkeypatch, lambda level: 0.08 if level else 0.10)
    loop.run_trial(TRIAL_DECIDED + 1)
    assert loop.trial.chosen == 1 and loop.level(), loop.trial.decision
    assert loop.trial.decision.startswith("workers level with the training step (nice +0): the loop ran 1.25x")


@pytest.mark.parametrize("level_s", [0.13, 0.10, 0.1005])
def test_stepped_back_stays_unless_level_wins_clearly(monkeypatch, level_s):
    """Slower level, equal, or faster by less than NICE_MIN_GAIN: the workers stay stepped back."""
    assert NICE_MIN_GAIN > 0.10 / 0.1005
    loop = FakeTrialLoop(monkeypatch, lambda level: level_s if level else 0.10)
    loop.run_trial(NICE_WARMUP_BATCHES + NICE_MAX_BLOCKS * TRIAL_BLOCK_BATCHES + 1)
    assert loop.trial.chosen == 0 and loop.nice == {101: 10, 102: 10}, loop.trial.decision
    assert loop.trial.decision.startswith("workers stepped back to nice +10, the training step first")


def test_a_verdict_the_loop_later_contradicts_is_overturned_and_the_tuner_told(monkeypatch):
    phase = {"level_s": 0.08}
    loop = FakeTrialLoop(monkeypatch, lambda level: phase["level_s"] if level else 0.10)
    loop.run_trial(TRIAL_DECIDED + 1)
    assert loop.trial.chosen == 1 and loop.changes == []  # the first verdict changes nothing measured before
    phase["level_s"] = 0.13  # the loop changed phase: level is now slower
    for _ in range(NICE_RECHECK_MAX_BATCHES * 4):
        loop.run_trial(1)
        if loop.trial.chosen == 0:
            break
    assert loop.trial.chosen == 0 and loop.nice == {101: 10, 102: 10}, loop.trial.decision
    assert "again: later blocks overturned" in loop.trial.decision and len(loop.changes) == 1


def test_a_replacement_gets_the_chosen_priority(monkeypatch):
    loop = FakeTrialLoop(monkeypatch, lambda level: 0.10 if level else 0.08)
    loop.run_trial(TRIAL_DECIDED + 1)
    loop.workers = [102, 103]  # 101 died and was replaced; the replacement starts level
    loop.nice[103] = 0
    loop.run_trial(NICE_SPAN_BATCHES)
    assert loop.nice[103] == 10


def test_a_refused_lowering_stops_the_trial_stepped_back(monkeypatch):
    """``may_lower_nice`` said yes, and the system said no: the workers go back to (stay at) the safe setting."""
    loop = FakeTrialLoop(monkeypatch, lambda level: 0.08 if level else 0.10, may_lower=False)
    loop.run_trial(TRIAL_DECIDED + 1)
    assert loop.nice == {101: 10, 102: 10} and loop.trial.trial.stopped
    assert loop.trial.decision.startswith("workers stay at nice +10: lowering a nice value was refused")


def test_may_lower_nice_reads_the_rlimit_and_the_capability(monkeypatch, tmp_path):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (0, 0))
    status = tmp_path / "status"
    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(status if path == "/proc/self/status" else path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    status.write_text(f"CapEff:\t{1 << _stepback.CAP_SYS_NICE:016x}\n")
    assert _stepback.may_lower_nice(0)
    status.write_text("CapEff:\t0000000000000000\n")
    assert not _stepback.may_lower_nice(0)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (20, 20))  # RLIMIT_NICE 20: down to nice 0
    assert _stepback.may_lower_nice(0) and not _stepback.may_lower_nice(-1)
