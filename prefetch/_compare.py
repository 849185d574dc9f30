"""Comparing two settings of a running loop, beyond the noise: the measurement behind ``train_threads="auto"``.

Setting A is the user's, setting B the candidate. The loop runs windows of batches in a balanced order,
blocks of four windows ``A B B A``: a drift in the loop's speed that is linear over a block (warm-up,
caches filling, another process starting) hits A and B alike, where ``A B A B`` would credit it to one
of them. Each block gives one figure, ``log(rate of B / rate of A)``; the blocks' spread *is* the measured
noise. The verdict is:

* ``B`` when B is faster by at least ``min_gain`` and the mean is more than its margin (Student's t at
  97.5 % times the standard error of the blocks' mean) above zero;
* ``A`` when A is faster beyond the margin, or when both agree within ``min_gain``, margin included
  (nothing to gain either way);
* none (``NOISE``) otherwise: the difference cannot be told from the noise yet. A caller that has
  measured enough blocks keeps the user's setting and says why (``Verdict.why``).

The comparison keeps the last ``max_blocks`` blocks only, so a caller that goes on measuring now and then
sees a verdict that was right early and is wrong now (the loop changed) overturned. ``Comparison`` is pure:
no clock, no process, no framework.

``Trial`` runs a comparison on a loop, for ``train_threads="auto"`` (``_tuning``), ``worker_nice="auto"``
(``_stepback``) and a park of ``workers="auto"`` (``autoscaler``). Told each batch the loop asks for
(``tick``), after ``warmup_batches`` it times windows of ``window_batches`` batches -- the whole cycle,
training step and wait included, which is what the user gets -- asking its owner to put A or B in force
before each window (``apply``); after a change of setting the first ``settle_batches`` ticks are not timed,
for a setting whose effect lags (work already begun under the other). When the blocks tell the two apart,
or ``max_blocks`` could not, it hands the verdict over (``settle``), then measures one more block now and
then (``recheck_batches``, doubling up to ``recheck_max_batches``): a verdict the loop's later behaviour
contradicts is overturned. The rate is what the loop can *sustain*: batches taken less those the window
drained from the buffer of ready batches. A setting that speeds the step up by starving the workers looks
fast while the buffer lasts; counted this way, it does not. See ``docs/design.md``, *Sharing the cores with
the training step*.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Student's t at 97.5 % by degrees of freedom (blocks - 1): the margin is t times the standard error.
T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}
T_975_MANY = 2.0
# The windows of one block: A B B A (0 = A, the user's setting; 1 = B).
BLOCK = (0, 1, 1, 0)
A, B, NOISE = "A", "B", ""


@dataclass(frozen=True)
class Verdict:
    """What the blocks so far say: ``choice`` is ``A``, ``B`` or ``NOISE`` (not told apart yet)."""

    choice: str
    gain: float  # B's rate over A's (geometric mean over the blocks)
    margin: float  # the noise: the gain is known to within a factor of 1 +- margin
    blocks: int
    rates: tuple[float, float]  # A's and B's sustained batches per second, over every window kept

    @property
    def why(self) -> str:
        within = f"{self.gain:.2f}x, +-{self.margin:.0%} over {self.blocks} blocks"
        if self.choice == B:
            return f"faster by {within}"
        if self.choice == A and self.gain >= 1.0:
            return f"no clear gain ({within})"
        if self.choice == A:
            return f"slower ({within})"
        return f"within the noise ({within})"


@dataclass
class Comparison:
    """Windows of A and B in ``BLOCK`` order; ``verdict()`` once at least ``min_blocks`` are complete."""

    min_gain: float  # B must beat A by this factor to be chosen
    min_blocks: int = 3
    max_blocks: int = 8
    blocks: list[tuple[float, float, float, float]] = field(default_factory=list)  # (A batches, A s, B ..., B s)
    current: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    windows: int = 0  # windows added to the block being measured

    def setting(self) -> int:
        """The setting the next window runs with: 0 (A) or 1 (B)."""
        return BLOCK[self.windows]

    def add(self, batches: float, seconds: float) -> bool:
        """The window just run (``setting()``'s) made ``batches`` (sustained) in ``seconds``; True when it
        completed a block."""
        at = 2 * self.setting()
        self.current[at] += batches
        self.current[at + 1] += seconds
        self.windows += 1
        if self.windows < len(BLOCK):
            return False
        a_batches, a_s, b_batches, b_s = self.current
        self.blocks = [*self.blocks, (a_batches, a_s, b_batches, b_s)][-self.max_blocks :]
        self.current, self.windows = [0.0, 0.0, 0.0, 0.0], 0
        return True

    def restart_block(self) -> None:
        """Drop the block being measured (its windows are no longer comparable: a setting was changed)."""
        self.current, self.windows = [0.0, 0.0, 0.0, 0.0], 0

    def clear(self) -> None:
        """Forget every block (the loop changed: other workers, another priority)."""
        self.blocks = []
        self.restart_block()

    def verdict(self) -> Verdict:
        ratios = [math.log(_rate(b, b_s) / _rate(a, a_s)) for a, a_s, b, b_s in self.blocks]
        totals = [sum(column) for column in zip(*self.blocks)] or [0.0] * 4
        rates = (_rate(totals[0], totals[1]), _rate(totals[2], totals[3]))
        n = len(ratios)
        if n == 0:
            return Verdict(NOISE, 1.0, math.inf, 0, rates)
        mean = statistics.fmean(ratios)
        spread = statistics.stdev(ratios) if n > 1 else math.inf
        margin = T_975.get(n - 1, T_975_MANY) * spread / math.sqrt(n) if n > 1 else math.inf
        choice = NOISE
        if n >= self.min_blocks:
            floor = math.log(self.min_gain)
            if mean - margin > 0 and mean >= floor:
                choice = B
            elif mean + margin < 0 or abs(mean) + margin < floor:
                choice = A
        return Verdict(choice, math.exp(mean), math.expm1(margin) if math.isfinite(margin) else math.inf, n, rates)


def _rate(batches: float, seconds: float) -> float:
    """Batches per second, never 0 (a window that drained as much as it took still took time)."""
    return max(batches, 0.5) / max(seconds, 1e-9)


@dataclass
class Trial:
    """The windows of one A/B comparison; ``apply(0 or 1)`` returns False when the owner cannot apply a
    setting any more (the trial then stops)."""

    apply: Callable[[int], bool]  # put setting A (0) or B (1) in force for the next window
    settle: Callable[[Verdict], None]  # what the blocks say: the owner applies its choice
    comparison: Comparison
    window_batches: int
    warmup_batches: int
    recheck_batches: int
    recheck_max_batches: int
    settle_batches: int = 0  # after a change of setting, ticks not timed (work begun under the other one lands)
    batches: int = 0  # ticks so far
    measuring: bool = False  # a window is being timed
    stopped: bool = False  # the owner could not apply a setting: nothing more to measure
    settled: bool = False  # a verdict has been handed over (the rest is checking it)
    next_check: int = field(init=False)  # the tick at which the next block starts
    recheck: int = field(init=False)  # batches from a verdict to the next check
    window_left: int = 0  # ticks until the window being timed ends
    window_started: float = 0.0
    window_ready: int = 0  # ready batches when the window began
    settling: int = 0  # ticks before the window being measured is timed
    in_force: int = 0  # the setting last applied (A, the setting in force before the trial)

    def __post_init__(self) -> None:
        self.next_check, self.recheck = self.warmup_batches, self.recheck_batches

    def tick(self, ready: int) -> None:
        """One more batch asked for, with ``ready`` batches waiting in the buffer (a counter between windows)."""
        if self.stopped:
            return
        self.batches += 1
        if self.measuring and self.settling:
            self.settling -= 1
            if self.settling == 0:
                self._time_window(ready)
        elif self.measuring:
            self.window_left -= 1
            if self.window_left == 0:
                self._end_window(ready)
        elif self.batches >= self.next_check:
            self._begin_window(ready)

    def _begin_window(self, ready: int) -> None:
        setting = self.comparison.setting()
        if not self.apply(setting):
            self.stopped, self.measuring = True, False
            return
        changed, self.in_force, self.measuring = setting != self.in_force, setting, True
        self.settling = self.settle_batches if changed else 0
        if not self.settling:
            self._time_window(ready)

    def _time_window(self, ready: int) -> None:
        self.window_left, self.window_ready = self.window_batches, ready
        self.window_started = time.perf_counter()

    def _end_window(self, ready: int) -> None:
        seconds = time.perf_counter() - self.window_started
        drained = max(0, self.window_ready - ready)
        self.measuring = False
        if not self.comparison.add(self.window_batches - drained, seconds):
            self._begin_window(ready)
            return
        verdict = self.comparison.verdict()
        if verdict.choice == NOISE and not self.settled and verdict.blocks < self.comparison.max_blocks:
            self._begin_window(ready)  # not told apart yet: one more block
            return
        self.settled = True
        self.next_check = self.batches + self.recheck
        self.recheck = min(2 * self.recheck, self.recheck_max_batches)
        self.settle(verdict)

    def pause(self) -> None:
        """The loop was away (between epochs): the block being timed is dropped and begun again at the next
        tick; the blocks already complete are kept."""
        self.comparison.restart_block()
        if self.measuring:
            self.measuring, self.settling = False, 0
            self.next_check = self.batches + 1

    def restart(self) -> None:
        """The loop changed under the trial (workers added or parked, their priority changed): forget the
        blocks and measure again, from the setting in force, after a warm-up."""
        self.comparison.clear()
        self.measuring, self.settled, self.settling = False, False, 0
        self.next_check = self.batches + self.warmup_batches
        self.recheck = self.recheck_batches
