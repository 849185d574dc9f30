"""``workers="auto"``: how many of the forked workers get tasks, and how deep the window is, decided on figures.

``Controller`` is plain state with no process, pipe or clock in it: it is handed one ``Measure`` per
measurement window (``autoscaler.AutoScaler`` makes them in the loop's thread) and answers a ``Setting``
when it changes something. It starts at the budget (every worker, the whole window) and moves one worker
at a time, never above the budget nor below one. The batches do not depend on it: a parked worker
simply gets no tasks, and a batch is a pure function of (seed, batch number). See ``docs/design.md``
("Workers on figures: workers="auto"").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

# The loop waits for data in more than this share of a window: it is starved. Below WAIT_CALM_SHARE it
# is not; between the two the controller holds (noise). A higher bar adds fewer workers that would help
# a little; a lower calm bar parks fewer workers that cost the step nothing.
WAIT_STARVED_SHARE = 0.05
WAIT_CALM_SHARE = 0.01
# The working workers are saturated when busy making batches this share of the window: one more helps.
# Below it, the loop's wait comes from the window (a credit's trip), not from too few workers.
BUSY_SATURATED_SHARE = 0.85
# The cores are contended when the loop's own thread waited for a core (run queue) this share of the
# window, or the loop's CPU and the workers' busy time together reach the budget of cores.
RUN_QUEUE_CONTENDED_SHARE = 0.03
# The same verdict this many windows in a row before it is acted on: one noisy window changes nothing.
STREAK_WINDOWS = 2
# Windows ignored after the start and after each change: the pool fills or drains, the figures lag.
SETTLE_WINDOWS = 1


class Measure(NamedTuple):
    """One window's figures, as shares of its wall time (``loop_cpu``: cores)."""

    wait: float  # the loop's wait for data
    busy: float  # the working workers' time making batches, per worker
    loop_cpu: float  # CPU the loop's process used (the training step and its threads included)
    run_queue: float  # the loop's thread waiting for a core
    memory_low: bool = False  # available memory is below the floor: no worker is added


class Setting(NamedTuple):
    """Workers given tasks (the first of the forked ones) and the window (batches ready or in flight)."""

    workers: int
    window: int


def window_for(workers: int, budget: int, deepest: int, shallowest: int = 1) -> int:
    """The window for ``workers`` of ``budget``: the same share of the deepest (the budget's ``prefetch``), and
    never below ``shallowest`` (the consumer returns credits in steps: a window shallower would stall)."""
    return max(shallowest, min(deepest, max(workers, math.ceil(deepest * workers / budget))))


@dataclass
class Controller:
    """The decisions of ``workers="auto"`` for a pool of ``budget`` forked workers and a window of at most
    ``deepest`` batches (the configuration's ``prefetch``, which sizes the slots and their bytes) and at least
    ``shallowest`` (``LoaderConfig.credit_step + 1``).

    Each verdict needs ``STREAK_WINDOWS`` windows in a row; each change is followed by ``SETTLE_WINDOWS``
    ignored. The loop waits and the workers are saturated: one more worker. It waits and they are not:
    a deeper window. It does not wait and the cores are contended: one fewer (with its share of the window).
    A park that made the loop wait is undone and not tried again (``floor``): it cannot oscillate."""

    budget: int
    deepest: int
    shallowest: int = 1
    workers: int = 0  # 0: the budget
    window: int = 0  # 0: the deepest
    floor: int = 1  # never parked below this
    settle: int = SETTLE_WINDOWS
    verdict: str | None = None  # the last window's
    streak: int = 0
    last: str = ""  # the last change, in words
    history: list[str] = field(default_factory=list)  # every change, in words

    def __post_init__(self) -> None:
        self.budget = max(1, self.budget)
        self.deepest = max(1, self.deepest)
        self.shallowest = max(1, min(self.shallowest, self.deepest))
        self.workers = min(self.budget, self.workers or self.budget)
        self.window = min(self.deepest, self.window or self.deepest)

    @property
    def setting(self) -> Setting:
        return Setting(self.workers, self.window)

    def _verdict(self, m: Measure) -> str | None:
        if m.wait >= WAIT_STARVED_SHARE:
            if m.busy >= BUSY_SATURATED_SHARE and self.workers < self.budget and not m.memory_low:
                return "add"
            if m.busy < BUSY_SATURATED_SHARE and self.window < self.deepest:
                return "deepen"
            return None
        contended = m.run_queue >= RUN_QUEUE_CONTENDED_SHARE or m.loop_cpu + m.busy * self.workers >= self.budget
        if m.wait <= WAIT_CALM_SHARE and contended and self.workers > self.floor:
            return "park"
        return None

    def decide(self, m: Measure) -> Setting | None:
        """One window's figures; the new setting when it changes, else None."""
        if self.settle > 0:
            self.settle -= 1
            return None
        verdict = self._verdict(m)
        self.streak = self.streak + 1 if verdict == self.verdict else 1
        self.verdict = verdict
        if verdict is None or self.streak < STREAK_WINDOWS:
            return None
        before = self.setting
        if verdict == "add":
            if self.history and self.history[-1].startswith("park"):
                self.floor = self.workers + 1  # parking cost the loop its data: never again below this
            self.workers += 1
            self.window = max(self.window, window_for(self.workers, self.budget, self.deepest, self.shallowest))
        elif verdict == "deepen":
            self.window = min(self.deepest, self.window + self.workers)
        else:
            self.workers -= 1
            self.window = window_for(self.workers, self.budget, self.deepest, self.shallowest)
        self.last = (
            f"{verdict} {before.workers}->{self.workers} workers, window {before.window}->{self.window}: "
            f"loop waited {m.wait:.0%}, workers busy {m.busy:.0%}, loop CPU {m.loop_cpu:.2f} cores, "
            f"run queue {m.run_queue:.0%}"
        )
        self.history.append(self.last)
        self.verdict, self.streak, self.settle = None, 0, SETTLE_WINDOWS
        return self.setting

    def undo_park(self, before: Setting, why: str) -> None:
        """The park just decided is not kept (it did not make the loop faster when measured, or it came too late
        to be measured): back to ``before``, and never parked below it again (``floor``)."""
        self.workers, self.window = before
        self.floor = max(self.floor, before.workers)
        self.last = f"kept {before.workers} workers: {why}"
        self.history.append(self.last)
