"""``workers="auto"`` in the loop's thread: measures windows of batches and applies ``core.autoscale``'s decisions.

``AutoScaler.tick`` is called once per batch the loop takes, with the stats recorder's running totals (the
loop's wait, the workers' time making batches): between windows it compares one integer. At the end of a
window (``WINDOW_BATCHES`` batches and at least ``WINDOW_MIN_S``) it reads the clocks -- the loop's
process CPU, its thread's run-queue wait (``/proc/thread-self/schedstat``), the available memory
(``_budget``) -- hands the ``Controller`` a ``Measure``, and passes a new setting to the executor's run
(``resize(workers, window)``). A park is not kept on those figures alone: the loop's sustained rate with and
without the worker is compared first, in balanced blocks (``_compare.Trial``), and the worker stays parked
only when the loop is measurably faster without it. While that trial runs (``measuring``), nothing else is
timed. See ``docs/design.md`` ("Workers on figures: workers="auto"").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from . import _budget
from ._compare import B, Comparison, Trial, Verdict
from .core.autoscale import BUSY_SATURATED_SHARE, WAIT_STARVED_SHARE, Controller, Measure, Setting

# Batches per measurement window: longer windows are less noisy, shorter ones converge sooner (a change
# takes SETTLE_WINDOWS + STREAK_WINDOWS windows: 48 batches at 16).
WINDOW_BATCHES = 16
# ... and at least this long, so that a very fast loop's window is not a few timer ticks.
WINDOW_MIN_S = 0.05
# No worker is added while less memory than this is available (a worker given tasks grows its memory).
MEMORY_FLOOR_BYTES = 512 * 2**20
# A park on trial: windows of PARK_WINDOW_BATCHES with the worker (A) and without it (B), in A B B A blocks,
# the prefetch window held at A's so that only the worker differs. After each switch PARK_SETTLE_BATCHES are
# not timed: a parked worker still delivers the tasks it holds (up to the window's share), and one given
# tasks again delivers its first a batch time later -- counted, that carry-over favoured the park (measured
# 1.06x "faster" parked on a loop that runs 0.88x with one worker fewer). The park is kept when the loop runs
# at least PARK_MIN_GAIN faster without it, beyond the noise, within PARK_MAX_BLOCKS blocks (4 * 8 + 2 * 6 =
# 44 batches a block); otherwise the worker stays. A tie keeps it: a parked worker that was needed costs the
# loop its data, one kept that was not costs a little of a core.
PARK_WINDOW_BATCHES = 8
PARK_SETTLE_BATCHES = 6
PARK_MIN_GAIN = 1.03
PARK_MIN_BLOCKS = 3
PARK_MAX_BLOCKS = 4
PARK_BLOCK_BATCHES = 4 * PARK_WINDOW_BATCHES + 2 * PARK_SETTLE_BATCHES
# The worker count settles by this batch: a park is tried only if its shortest trial (PARK_MIN_BLOCKS
# blocks) can end by then, and a trial still undecided then keeps the worker. Later, a park verdict is set
# aside for good (the floor); only the add rule (the loop starved after a kept park) and the window move.
SETTLE_BY_BATCH = 300
_SCHEDSTAT = "/proc/thread-self/schedstat"


class Change(NamedTuple):
    """One change ``workers="auto"`` made: at which batch the loop had taken, to what setting."""

    batch: int
    workers: int
    window: int


class _Mark(NamedTuple):
    batches: int
    wall_s: float
    cpu_s: float
    run_queue_s: float
    wait_s: float
    busy_s: float


def run_queue_seconds() -> float:
    """Seconds the calling thread has waited for a core (0.0 where the kernel does not say)."""
    try:
        with open(_SCHEDSTAT, "rb") as file:
            fields = file.read().split()
        return int(fields[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def read_clocks() -> tuple[float, float, float]:
    """(wall, the process's CPU, the thread's run-queue wait), in seconds."""
    return time.perf_counter(), time.process_time(), run_queue_seconds()


class AutoScaler:
    """Measure, decide, apply: ``resize`` is the run's (``ProcessRun.resize``)."""

    def __init__(
        self,
        budget: int,
        deepest: int,
        shallowest: int,
        resize: Callable[[int, int], None],
        clocks: Callable[[], tuple[float, float, float]] = read_clocks,
        memory: Callable[[], int | None] = _budget.available_memory,
    ):
        self.controller = Controller(budget, deepest, shallowest)
        self.resize = resize
        self.clocks, self.memory = clocks, memory  # tests pass fake ones
        self.changes: list[Change] = []
        self.mark: _Mark | None = None
        self.next_at = 0  # the batch count at which the next window may end
        self.trial: Trial | None = None  # a park being measured
        self.trying: tuple[Setting, Setting] = (self.setting, self.setting)  # the trial's (with, without)
        self.applied = self.setting  # what the run was last told
        self.batches = 0

    @property
    def measuring(self) -> bool:
        """A park is on trial: the loop's rate is being timed with and without a worker."""
        return self.trial is not None

    @property
    def setting(self) -> Setting:
        return self.controller.setting

    def describe(self) -> str:
        """What it decided, for ``stats().decisions``."""
        now = self.setting
        tail = f"; last change: {self.controller.last}" if self.controller.last else ""
        if self.trial is not None:
            tail = f"; timing the loop with {self.trying[0].workers} and {self.trying[1].workers} workers{tail}"
        return (
            f"workers='auto': {now.workers} of {self.controller.budget} workers given tasks, window {now.window} "
            f"({len(self.changes)} change{'s' * (len(self.changes) != 1)}){tail}"
        )

    def restart(self) -> None:
        """The loop was away (the engine kept between epochs): the next batch starts a new window (a trial's
        block being timed is dropped)."""
        self.mark, self.next_at = None, 0
        if self.trial is not None:
            self.trial.pause()

    def measure(self, was: _Mark, now: _Mark) -> Measure:
        """The window between two marks (a method, so that tests can put a fake source in its place). Memory is
        read only when a worker could be added (about a millisecond: cgroup files)."""
        wall = max(now.wall_s - was.wall_s, 1e-9)
        wait = min(1.0, (now.wait_s - was.wait_s) / wall)
        busy = min(1.0, (now.busy_s - was.busy_s) / wall / self.setting.workers)
        could_add = wait >= WAIT_STARVED_SHARE and busy >= BUSY_SATURATED_SHARE
        memory = self.memory() if could_add and self.setting.workers < self.controller.budget else None
        return Measure(
            wait=wait,
            busy=busy,
            loop_cpu=(now.cpu_s - was.cpu_s) / wall,
            run_queue=min(1.0, (now.run_queue_s - was.run_queue_s) / wall),
            memory_low=memory is not None and memory < MEMORY_FLOOR_BYTES,
        )

    def tick(self, batches: int, wait_s: float, busy_s: Callable[[], float], ready: int = 0) -> None:
        """The loop took its ``batches``-th batch; ``wait_s`` it waited in all, ``busy_s()`` the workers' time
        in all (called only at a window's end); ``ready`` batches wait in the buffer."""
        self.batches = batches
        if self.trial is not None:
            self.trial.tick(ready)
            if self.trial is not None and batches >= SETTLE_BY_BATCH:
                self._settle(self.trial.comparison.verdict(), late=True)  # undecided by then: the worker stays
            return
        if batches < self.next_at:
            return
        now = _Mark(batches, *self.clocks(), wait_s, busy_s())
        was, self.mark = self.mark, now
        self.next_at = batches + WINDOW_BATCHES
        if was is None:
            return
        if now.wall_s - was.wall_s < WINDOW_MIN_S:
            self.mark, self.next_at = was, batches + 1  # too short yet: the window goes on
            return
        before = self.setting
        setting = self.controller.decide(self.measure(was, now))
        if setting is None:
            return
        if setting.workers >= before.workers:
            self.apply(setting)
        elif batches + PARK_MIN_BLOCKS * PARK_BLOCK_BATCHES > SETTLE_BY_BATCH:
            self.controller.undo_park(
                before, f"a park proposed at batch {batches} is not timed (settled by batch {SETTLE_BY_BATCH})"
            )
        else:
            self.try_park(before, setting)

    def apply(self, setting: Setting) -> None:
        """Put ``setting`` in force for good (a change ``stats().auto_changes`` lists)."""
        self.changes.append(Change(self.batches, *setting))
        self._tell(setting)

    def _tell(self, setting: Setting) -> None:
        if setting != self.applied:
            self.resize(*setting)
            self.applied = setting

    def try_park(self, before: Setting, parked: Setting) -> None:
        """Time the loop with ``before``'s workers and with ``parked``'s before keeping either."""
        self.trying = (before, parked)
        comparison = Comparison(PARK_MIN_GAIN, PARK_MIN_BLOCKS, PARK_MAX_BLOCKS)
        self.trial = Trial(self._window, self._settle, comparison, PARK_WINDOW_BATCHES, 1, 0, 0, PARK_SETTLE_BATCHES)

    def _window(self, setting: int) -> bool:
        before, parked = self.trying
        self._tell(Setting(parked.workers if setting == 1 else before.workers, before.window))
        return True

    def _settle(self, verdict: Verdict, late: bool = False) -> None:
        """The trial's verdict (``late``: the blocks so far, at ``SETTLE_BY_BATCH``): keep the park only when the
        loop measured faster without the worker."""
        before, parked = self.trying
        self.trial = None
        self.mark, self.next_at = None, 0  # the next window starts after the trial
        if verdict.choice == B:
            self.controller.last += f"; measured {verdict.why}"
            self.apply(parked)
        else:
            by = f" by batch {SETTLE_BY_BATCH}" if late else ""
            self.controller.undo_park(before, f"parking one measured {verdict.why}{by}")
            self._tell(before)
