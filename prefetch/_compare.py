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
sees a verdict that was right early and is wrong now (the loop changed) overturned. Pure: no clock, no
process, no framework; see ``docs/design.md``, *Sharing the cores with the training step*.
"""

from __future__ import annotations

import math
import statistics
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
