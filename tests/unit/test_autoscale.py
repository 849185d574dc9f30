"""workers="auto"'s decisions on fake figures: ``core.autoscale.Controller`` (no process, no clock) and
``autoscaler.AutoScaler``'s windows on a fake clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from prefetch import _budget, _compare
from prefetch.autoscaler import (
    PARK_BLOCK_BATCHES,
    PARK_MAX_BLOCKS,
    PARK_MIN_BLOCKS,
    PARK_SETTLE_BATCHES,
    PARK_WINDOW_BATCHES,
    SETTLE_BY_BATCH,
    WINDOW_BATCHES,
    WINDOW_MIN_S,
    AutoScaler,
    Change,
)
from prefetch.core.autoscale import (
    BUSY_SATURATED_SHARE,
    SETTLE_WINDOWS,
    STREAK_WINDOWS,
    WAIT_CALM_SHARE,
    WAIT_STARVED_SHARE,
    Controller,
    Measure,
    Setting,
)
from prefetch.validation import make_config

# Figures well inside each verdict's region (derived from the thresholds, not copied from a run).
STARVED_SATURATED = Measure(wait=WAIT_STARVED_SHARE * 4, busy=1.0, loop_cpu=0.2, run_queue=0.0)
STARVED_IDLE_WORKERS = Measure(wait=WAIT_STARVED_SHARE * 4, busy=BUSY_SATURATED_SHARE / 3, loop_cpu=0.2, run_queue=0.0)
CALM_CONTENDED = Measure(wait=0.0, busy=0.9, loop_cpu=1.8, run_queue=0.2)
CALM_UNCONTENDED = Measure(wait=0.0, busy=0.1, loop_cpu=0.1, run_queue=0.0)
IN_BETWEEN = Measure(wait=(WAIT_CALM_SHARE + WAIT_STARVED_SHARE) / 2, busy=1.0, loop_cpu=1.8, run_queue=0.2)
WINDOWS_PER_CHANGE = SETTLE_WINDOWS + STREAK_WINDOWS
# A park trial's block: four windows and two switches (A B B A), each switch followed by untimed batches.


def feed(controller: Controller, measure: Measure, windows: int) -> list[Setting]:
    """The settings ``controller`` changed to over ``windows`` windows of ``measure``."""
    return [s for s in (controller.decide(measure) for _ in range(windows)) if s is not None]


def test_it_adds_a_worker_when_the_loop_waits_and_the_workers_are_saturated():
    controller = Controller(budget=4, deepest=8, workers=1, window=2)
    changes = feed(controller, STARVED_SATURATED, WINDOWS_PER_CHANGE)
    assert changes == [Setting(2, 4)]  # one worker more, and its share of the window
    assert "add 1->2 workers" in controller.last


def test_it_parks_a_worker_when_the_loop_does_not_wait_and_the_cores_are_contended():
    controller = Controller(budget=4, deepest=8)
    assert controller.setting == Setting(4, 8)  # it starts at the budget
    changes = feed(controller, CALM_CONTENDED, WINDOWS_PER_CHANGE)
    assert changes == [Setting(3, 6)]
    # contention seen from the loop's CPU and the workers' time alone (no run-queue figure) parks too
    loop_and_workers_fill_the_cores = CALM_CONTENDED._replace(run_queue=0.0, loop_cpu=2.0, busy=0.7)  # 2 + 0.7 * 3
    assert feed(controller, loop_and_workers_fill_the_cores, WINDOWS_PER_CHANGE) == [Setting(2, 4)]


def test_it_holds_when_the_loop_does_not_wait_and_the_cores_are_free():
    controller = Controller(budget=4, deepest=8)
    assert feed(controller, CALM_UNCONTENDED, 50) == []


def test_it_never_goes_above_the_budget_nor_below_one_worker():
    budget = _budget.cpu_budget().cpus
    config = make_config((list(range(10)),), batch_size=2, workers="auto")
    assert config.workers == budget and config.auto_workers  # forked: the budget
    controller = Controller(budget=budget + 0, deepest=3 * budget, workers=1)
    seen = [s.workers for s in feed(controller, STARVED_SATURATED, 40 * budget)]
    assert seen == list(range(2, budget + 1))  # one at a time, up to the budget and no further
    seen = [s.workers for s in feed(Controller(budget=budget, deepest=8), CALM_CONTENDED, 40 * budget)]
    assert seen == list(range(budget - 1, 0, -1))


def test_it_holds_within_noise():
    controller = Controller(budget=4, deepest=8, workers=2, window=4)
    assert feed(controller, IN_BETWEEN, 50) == []  # between the calm and the starved bars
    alternating = [STARVED_SATURATED, CALM_CONTENDED] * 25  # each verdict once, never twice in a row
    assert [s for s in map(controller.decide, alternating) if s is not None] == []
    one_bad_window = [CALM_UNCONTENDED, STARVED_SATURATED] * 25
    assert [s for s in map(controller.decide, one_bad_window) if s is not None] == []


def test_a_park_that_made_the_loop_wait_is_undone_and_not_tried_again():
    controller = Controller(budget=4, deepest=8)
    assert feed(controller, CALM_CONTENDED, WINDOWS_PER_CHANGE) == [Setting(3, 6)]
    assert feed(controller, STARVED_SATURATED, WINDOWS_PER_CHANGE) == [Setting(4, 8)]
    assert feed(controller, CALM_CONTENDED, 50) == []  # 4 is the floor now: no oscillation
    assert controller.floor == 4


def test_a_loop_waiting_on_idle_workers_gets_a_deeper_window_not_more_workers():
    controller = Controller(budget=4, deepest=8, workers=2, window=4)
    assert feed(controller, STARVED_IDLE_WORKERS, 3 * WINDOWS_PER_CHANGE) == [Setting(2, 6), Setting(2, 8)]


def test_no_worker_is_added_while_memory_is_low():
    controller = Controller(budget=4, deepest=8, workers=1, window=2)
    assert feed(controller, STARVED_SATURATED._replace(memory_low=True), 50) == []


def test_the_window_never_shrinks_below_the_credit_step():
    controller = Controller(budget=8, deepest=16, shallowest=5)
    settings = feed(controller, CALM_CONTENDED, 40)
    assert settings[-1] == Setting(1, 5) and all(s.window >= 5 for s in settings)


class FakeClock:
    """The wall clock, the process's CPU and the run-queue wait, moved by hand."""

    def __init__(self) -> None:
        self.wall = self.cpu = self.run_queue = 0.0

    def __call__(self) -> tuple[float, float, float]:
        return self.wall, self.cpu, self.run_queue


class ContendedLoop:
    """A loop that never waits for data on contended cores (the controller's figures for a park), taking
    ``seconds(workers)`` per batch with the workers the scaler last told the run; ``_compare``'s clock is its."""

    def __init__(self, monkeypatch, seconds=lambda workers: 2 * WINDOW_MIN_S / WINDOW_BATCHES) -> None:
        self.clock, self.resized, self.seconds, self.batches = FakeClock(), [], seconds, 0
        self.busy, self.after_switch_s, self.switched = 0.0, 0.0, [0]
        self.scaler = AutoScaler(4, 8, 2, self.resize, self.clock, lambda: 2**40)
        monkeypatch.setattr(_compare.time, "perf_counter", lambda: self.clock.wall)

    def resize(self, workers: int, window: int) -> None:
        self.resized.append((workers, window))
        self.switched.append(self.batches)

    def run(self, batches: int) -> None:
        for _ in range(batches):
            workers = self.resized[-1][0] if self.resized else 4
            seconds = self.seconds(workers)
            if self.resized and self.batches - self.switched[-1] < PARK_SETTLE_BATCHES:
                seconds += self.after_switch_s  # work begun under the other setting lands now
            self.batches += 1
            self.clock.wall += seconds
            self.clock.cpu += 1.8 * seconds  # the loop uses 1.8 cores
            self.clock.run_queue += 0.2 * seconds  # and waits for a core a fifth of the time
            self.busy += workers * 0.9 * seconds  # the workers are busy 90 % of the time; the loop never waits
            self.scaler.tick(self.batches, 0.0, lambda: self.busy)


def test_the_scaler_measures_windows_of_batches_on_the_clock_and_puts_a_park_on_trial(monkeypatch):
    loop = ContendedLoop(monkeypatch)
    loop.run(1 + WINDOWS_PER_CHANGE * WINDOW_BATCHES)  # the first batch marks the first window's start
    assert loop.resized == [] and loop.scaler.measuring  # the controller would park: first, a trial
    assert "timing the loop with 4 and 3 workers" in loop.scaler.describe()


def test_a_park_the_loop_runs_faster_with_is_kept(monkeypatch):
    loop = ContendedLoop(monkeypatch, lambda workers: 0.010 if workers == 3 else 0.012)
    loop.run(1 + WINDOWS_PER_CHANGE * WINDOW_BATCHES)
    loop.run(PARK_MIN_BLOCKS * PARK_BLOCK_BATCHES + 1)
    assert not loop.scaler.measuring
    # A B B A with the window held at A's (8): only the worker differs; the first A is in force already
    trial, kept = loop.resized[:-1], loop.resized[-1]
    assert trial == [(3, 8), (4, 8)] * PARK_MIN_BLOCKS
    assert kept == (3, 6) and loop.scaler.changes == [Change(loop.batches, 3, 6)]
    assert "3 of 4 workers given tasks, window 6 (1 change)" in loop.scaler.describe()
    assert "measured faster by 1.20x" in loop.scaler.describe()


@pytest.mark.parametrize("parked_s", [0.010, 0.012], ids=["as-fast", "slower"])
def test_a_park_the_loop_is_not_faster_with_is_undone_and_not_tried_again(monkeypatch, parked_s):
    loop = ContendedLoop(monkeypatch, lambda workers: parked_s if workers == 3 else 0.010)
    loop.run(1 + WINDOWS_PER_CHANGE * WINDOW_BATCHES)
    loop.run(PARK_MIN_BLOCKS * PARK_BLOCK_BATCHES + 1)
    assert not loop.scaler.measuring and loop.resized[-1] == (4, 8)  # back to every worker
    assert loop.scaler.setting == Setting(4, 8) and loop.scaler.changes == []
    assert "kept 4 workers: parking one measured" in loop.scaler.describe()
    told = len(loop.resized)
    loop.run(50 * WINDOW_BATCHES)  # the same contended figures: no second trial
    assert len(loop.resized) == told and not loop.scaler.measuring


def test_the_batches_right_after_a_switch_are_not_timed(monkeypatch):
    loop = ContendedLoop(monkeypatch, lambda workers: 0.010 if workers == 3 else 0.012)  # parked is faster
    loop.after_switch_s = 1.0  # but the batches after each switch are 100x slower: timed, they would decide
    loop.run(1 + WINDOWS_PER_CHANGE * WINDOW_BATCHES)
    loop.run(PARK_MIN_BLOCKS * PARK_BLOCK_BATCHES + 1)
    assert not loop.scaler.measuring and loop.scaler.changes == [Change(loop.batches, 3, 6)]
    assert "measured faster by 1.20x" in loop.scaler.describe()


def test_a_trial_window_never_spans_the_pause_between_epochs(monkeypatch):
    loop = ContendedLoop(monkeypatch, lambda workers: 0.010)  # as fast with the worker parked as without
    loop.run(1 + WINDOWS_PER_CHANGE * WINDOW_BATCHES + PARK_WINDOW_BATCHES // 2)  # half into the first A window
    assert loop.scaler.measuring
    loop.clock.wall += 1000.0  # the loop is away (an evaluation), then adopts the kept engine
    loop.scaler.restart()
    loop.run(PARK_MIN_BLOCKS * PARK_BLOCK_BATCHES + 1)
    # Timed across the pause, A would look 100x slower and the park be kept.
    assert not loop.scaler.measuring and loop.scaler.setting == Setting(4, 8)


def test_a_park_proposed_too_late_to_be_timed_by_the_settle_batch_is_set_aside_for_good(monkeypatch):
    loop = ContendedLoop(monkeypatch, lambda workers: 0.010 if workers == 3 else 0.012)  # parked would be faster
    latest_start = SETTLE_BY_BATCH - PARK_MIN_BLOCKS * PARK_BLOCK_BATCHES  # its shortest trial ends by then
    loop.batches = latest_start - (1 + WINDOWS_PER_CHANGE * WINDOW_BATCHES) + 1  # figures for a park one later
    loop.run(1 + WINDOWS_PER_CHANGE * WINDOW_BATCHES)
    assert loop.batches == latest_start + 1
    assert not loop.scaler.measuring and loop.resized == [] and loop.scaler.changes == []
    assert f"is not timed (settled by batch {SETTLE_BY_BATCH})" in loop.scaler.describe()
    loop.run(50 * WINDOW_BATCHES)  # the same figures: never a trial, never a park
    assert not loop.scaler.measuring and loop.resized == []


def test_a_trial_still_undecided_at_the_settle_batch_keeps_every_worker(monkeypatch):
    loop = ContendedLoop(monkeypatch)

    def seconds(workers: int) -> float:  # parked: 1.25x faster in one block, 1.25x slower in the next
        trial = loop.scaler.trial
        odd = trial is not None and len(trial.comparison.blocks) % 2 == 1
        return 0.010 if workers == 4 else 0.010 * (1.25 if odd else 0.8)

    loop.seconds = seconds
    # the trial starts in time for its shortest length (3 blocks) but not its longest (4)
    before_park = 1 + WINDOWS_PER_CHANGE * WINDOW_BATCHES
    loop.batches = SETTLE_BY_BATCH - PARK_MIN_BLOCKS * PARK_BLOCK_BATCHES - before_park - 2 * WINDOW_BATCHES
    loop.run(before_park)
    assert loop.scaler.measuring
    started = loop.batches
    assert (
        started + PARK_MAX_BLOCKS * PARK_BLOCK_BATCHES
        > SETTLE_BY_BATCH
        >= started + PARK_MIN_BLOCKS * PARK_BLOCK_BATCHES
    )
    loop.run(SETTLE_BY_BATCH - loop.batches - 1)
    assert loop.scaler.measuring  # 3 blocks that contradict each other: not told apart yet
    loop.run(1)
    assert not loop.scaler.measuring and loop.resized[-1] == (4, 8)  # ended at the settle batch, every worker on
    assert loop.scaler.changes == [] and "within the noise" in loop.scaler.describe()
    assert f"by batch {SETTLE_BY_BATCH}" in loop.scaler.describe()
    told = len(loop.resized)
    loop.run(50 * WINDOW_BATCHES)
    assert len(loop.resized) == told and not loop.scaler.measuring


def test_a_window_shorter_than_the_minimum_goes_on_until_it_is_long_enough():
    clock, measured = FakeClock(), []
    scaler = AutoScaler(4, 8, 2, lambda w, p: None, clock, lambda: None)
    scaler.measure = lambda was, now: measured.append(now.batches - was.batches) or CALM_UNCONTENDED  # type: ignore[method-assign]
    for batch in range(1, 4 * WINDOW_BATCHES):
        clock.wall += WINDOW_MIN_S / (2 * WINDOW_BATCHES)  # a window of batches takes half the minimum
        scaler.tick(batch, 0.0, lambda: 0.0)
    assert measured and all(n >= 2 * WINDOW_BATCHES - 1 for n in measured)


@pytest.mark.parametrize("bad", ["Auto", "most", 2.5])
def test_workers_takes_auto_and_nothing_like_it(bad):
    with pytest.raises((TypeError, ValueError), match="None or 'auto'"):
        make_config((list(range(10)),), batch_size=2, workers=bad)


def test_auto_is_the_budget_on_a_run_that_cannot_resize():
    from prefetch.consumer import _auto_scaler

    class Resizable:
        def resize(self, workers: int, window: int) -> None: ...

    auto = make_config((list(range(10)),), batch_size=2, workers="auto")
    assert _auto_scaler(auto, object()) is None  # e.g. Ray's run: all the budget's workers work
    scaler = _auto_scaler(auto, Resizable())
    assert scaler is not None and scaler.setting == Setting(auto.workers, auto.prefetch)
    assert _auto_scaler(make_config((list(range(10)),), batch_size=2, workers=None), Resizable()) is None
    assert _auto_scaler(replace(auto, workers=1), Resizable()) is None  # a budget of one: nothing to decide
    assert make_config((list(range(10)),), batch_size=2).auto_workers  # the default


def test_no_window_spans_the_pause_between_epochs():
    clock, windows = FakeClock(), []
    scaler = AutoScaler(4, 8, 2, lambda w, p: None, clock, lambda: None)
    scaler.measure = lambda was, now: windows.append((was.wall_s, now.wall_s)) or CALM_UNCONTENDED  # type: ignore[method-assign]
    batch = 0
    for _ in range(WINDOW_BATCHES):  # the first window, unfinished when the epoch ends
        batch += 1
        clock.wall += 1.0
        scaler.tick(batch, 0.0, lambda: 0.0)
    clock.wall += 1000.0  # the loop is away (an evaluation), then adopts the kept engine
    scaler.restart()
    resumed_at = clock.wall
    for _ in range(WINDOW_BATCHES + 1):
        batch += 1
        clock.wall += 1.0
        scaler.tick(batch, 0.0, lambda: 0.0)
    assert windows == [(resumed_at + 1.0, clock.wall)]  # a window from the first batch after the pause


def test_memory_is_read_only_when_a_worker_could_be_added():
    clock, reads = FakeClock(), []
    scaler = AutoScaler(4, 8, 2, lambda w, p: None, clock, lambda: reads.append(1) or 100)  # 100 bytes: low
    wait = [0.0]
    for batch in range(1, 1 + 20 * WINDOW_BATCHES):
        clock.wall += 1.0
        wait[0] += 0.5  # the loop waits half the time, the workers are saturated: add, but memory is low
        scaler.tick(batch, wait[0], lambda: 4.0 * batch)  # noqa: B023
    assert reads == []  # at the budget already: no worker can be added, nothing read
    scaler.controller.workers = 2
    for batch in range(1 + 20 * WINDOW_BATCHES, 1 + 40 * WINDOW_BATCHES):
        clock.wall += 1.0
        wait[0] += 0.5
        scaler.tick(batch, wait[0], lambda: 2.0 * batch)  # noqa: B023
    assert reads and scaler.setting.workers == 2  # read, found low: no worker added
