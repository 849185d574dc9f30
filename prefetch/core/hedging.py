"""Hedged stragglers: when the batch the loop waits for is late, make it a second time (``Hedging``).

A batch is a pure function of its number, so two workers making it write the same bytes: whichever
copy arrives first is delivered, the other is dropped and its place given back (the reorder buffer
refuses duplicates). This module decides *when*: plain state and an injected clock, no process, so
the rule is tested on its own (``tests/unit/test_hedging_margin.py``). The executor (``processes``) measures
batch times into it, tells it which batch the loop asks for, and asks it whether to hedge now.

* Late means: the loop has waited for batch ``b`` longer than ``HEDGE_MARGIN_FACTOR`` times the median
  of the last ``HEDGE_WINDOW_BATCHES`` measured batch times (at least ``HEDGE_MIN_MARGIN_S``); no
  hedge before ``HEDGE_MIN_MEASURED`` batches are measured.
* Bounded: only the batch the loop waits for is hedged, each batch at most once, so at most one hedge
  is asked for at a time; and in all at most ``1 + HEDGE_SHARE`` times the batches asked for.

``ReadHedging`` is the same decision for one read inside a worker (``core.readahead.Loads`` does the reads):
late is ``READ_MARGIN_FACTOR`` median read times since the read started; fast sources are not hedged at all
(``READ_MIN_S``). Times are given to it, so it has no clock (``tests/unit/test_read_hedging.py``).

See ``docs/design.md`` ("Hedged stragglers", "Hedged reads").
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

# Batch times the margin is taken from: recent enough to follow a change of pace, enough for a median.
HEDGE_WINDOW_BATCHES = 64
# No hedge before this many batches are measured: a median of fewer is noise (and the first batches
# carry start-up costs).
HEDGE_MIN_MEASURED = 8
# Late = waited more than this many median batch times. In a full pipeline the loop waits at most about
# one batch time (a worker's queue ahead of it): lower hedges ordinary batches (extra work for nothing),
# higher lets a straggler cost more of the loop's time before it is hedged.
HEDGE_MARGIN_FACTOR = 3.0
# The margin's floor: batches of microseconds are not worth a second worker's time on jitter alone.
HEDGE_MIN_MARGIN_S = 0.002
# The cap on extra work: hedges at most 1 + this share of the batches asked for (5 %: a source whose
# every batch straggles costs at most 5 % more batches made, however the margin misjudges).
HEDGE_SHARE = 0.05


class Hedging:
    """The hedging state of one run: batch times, the batch the loop waits for and since when, the
    batches hedged. ``clock`` is seconds (``time.perf_counter``; a test passes a fake one)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.times: deque[float] = deque(maxlen=HEDGE_WINDOW_BATCHES)
        self._margin: float | None = None  # cached; None: to be computed again
        self.position = -1  # the batch the loop asks for
        self.since = 0.0  # when it asked for it
        self.first = -1  # the first batch asked for (the share's base)
        self.hedged = -1  # the last batch hedged: batches are hedged in order, each once
        self.hedges = 0  # hedges asked for, in all

    def measured(self, seconds: float) -> None:
        """A batch took ``seconds`` to make (its worker's timings)."""
        self.times.append(seconds)
        self._margin = None

    def margin(self) -> float | None:
        """How long the loop may wait for a batch before it is late; None until enough are measured."""
        if len(self.times) < HEDGE_MIN_MEASURED:
            return None
        if self._margin is None:
            ordered = sorted(self.times)
            self._margin = max(HEDGE_MIN_MARGIN_S, HEDGE_MARGIN_FACTOR * ordered[len(ordered) // 2])
        return self._margin

    def asked(self, position: int) -> None:
        """The loop asks for batch ``position`` (now, unless it asked already)."""
        if position != self.position:
            self.position, self.since = position, self.clock()
            if self.first < 0:
                self.first = position

    def deadline(self) -> float | None:
        """When the batch asked for becomes late (the clock's seconds), or None: it will not be hedged
        (hedged already, the cap reached, or too few batches measured)."""
        margin = self.margin()
        if margin is None or self.hedged >= self.position or not self._within_cap():
            return None
        return self.since + margin

    def due(self) -> int | None:
        """The batch to hedge now, counted as hedged; or None. Call it only while the batch asked for
        has not arrived."""
        deadline = self.deadline()
        if deadline is None or self.clock() < deadline:
            return None
        self.hedged, self.hedges = self.position, self.hedges + 1
        return self.position

    def _within_cap(self) -> bool:
        """One more hedge keeps them within ``1 + HEDGE_SHARE * batches asked for``."""
        return self.hedges <= HEDGE_SHARE * (self.position - self.first + 1)


# --- late reads, inside a worker (``ReadHedging``; the reads themselves: ``core/readahead.py``) ---------
# Read times the margin is taken from: a few batches' worth, enough for a median that ignores stragglers.
READ_WINDOW = 256
# No hedged read before this many reads are measured (the first batch's, at 32 samples a batch).
READ_MIN_MEASURED = 32
# Late = this many median read times since the read started. Reads queue behind nothing in their
# thread, so a read's own time is the measure: lower duplicates ordinary jitter, higher lets a
# straggler cost more of its batch before the copy starts.
READ_MARGIN_FACTOR = 3.0
# The margin's floor: the jitter of a sleep or a page fault is not worth a second read.
READ_MIN_MARGIN_S = 0.001
# Reads faster than this (median) are read as before, without hedging: threads cost a hand-off per batch
# and a lock per read (measured: see docs/design.md, "Hedged stragglers"), which only slow reads repay.
READ_MIN_S = 0.0001
# The cap on extra reads: at most 1 + this share of the reads measured (5 %, as HEDGE_SHARE).
READ_SHARE = 0.05


class ReadHedging:
    """When a read inside a worker is late enough to start it a second time: one per loader and process.

    Fed the time of every read (``measured``, or ``measured_batch`` when the batch was read without
    hedging); hedging is ``active`` while the median read is unknown or slow enough to repay the threads; a read
    started at ``started`` is late at ``deadline(started)``; ``take`` counts a hedge within the cap."""

    def __init__(self) -> None:
        self.times: deque[float] = deque(maxlen=READ_WINDOW)
        self.median: float | None = None  # cached; None: to be computed again
        self.reads = 0  # reads measured, in all (the share's base)
        self.hedges = 0  # reads started a second time, in all

    def measured(self, seconds: float) -> None:
        self.times.append(seconds)
        self.reads += 1
        self.median = None

    def measured_batch(self, seconds: float, reads: int, threads: int) -> None:
        """``reads`` reads took ``seconds`` in all, ``threads`` at a time: each counts as their mean. A mean under
        ``READ_MIN_S`` changes nothing but the count (the window holds enough fast reads already: no median to
        compute again, a fast source's batch costs a few operations)."""
        self.reads += reads
        mean = seconds * min(threads, reads) / max(reads, 1)
        if mean >= READ_MIN_S:
            self.times.extend([mean] * min(reads, READ_WINDOW))
            self.median = None

    def _median(self) -> float | None:
        if len(self.times) < READ_MIN_MEASURED:
            return None
        if self.median is None:
            self.median = sorted(self.times)[len(self.times) // 2]
        return self.median

    def active(self) -> bool:
        """Whether to read through threads and hedge: until the reads are measured (each read timed), and then
        while the median read takes at least ``READ_MIN_S``."""
        median = self._median()
        return median is None or median >= READ_MIN_S

    def margin(self) -> float | None:
        """How long a read may take before it is late; None until enough reads are measured."""
        median = self._median()
        return None if median is None else max(READ_MIN_MARGIN_S, READ_MARGIN_FACTOR * median)

    def deadline(self, started: float) -> float | None:
        """When a read started at ``started`` (the clock's seconds) is late, or None: none will be hedged
        (too few reads measured, or the cap reached)."""
        margin = self.margin()
        if margin is None or not self._within_cap():
            return None
        return started + margin

    def take(self) -> bool:
        """Count one hedged read if the cap allows it."""
        if not self._within_cap():
            return False
        self.hedges += 1
        return True

    def _within_cap(self) -> bool:
        return self.hedges < 1 + READ_SHARE * self.reads
