"""A batch's loads on the ``io_threads`` pool (``Loads``), late ones hedged; the next batch's loads started ahead.

``Loads``: ``min(threads, n)`` pullers on the process's pool (``threaded.pool``), each taking the batch's
next position until none is left, so a thread goes on to another sample as soon as its read is done, and
a batch costs a hand-off per thread rather than per sample. The samples land at their positions; a load
that raised fails the batch, for the first such position in the batch's order (positions are taken in
order, and none past a failed one is started), as soon as every position before it is in.

Hedged reads (``hedge=True``: ``Loads`` given the loader's ``core.hedging.ReadHedging``): every read is
timed, and the thread waiting in ``result`` sleeps until the earliest read in flight would be late (or the
batch is in) and starts a hedge for each late one on the spare pool: a puller that reads the same position
again and then takes the next positions like any other. Of the two copies of a position the first in is
taken -- but a hedge's error is dropped, so a source that raises for ``i`` raises as without hedging -- and
the puller whose copy was not taken ends, so ``threads`` pullers are at work again. A read-ahead batch's late
reads are hedged when the worker comes to wait for that batch (its reads are timed from their start, so
those already late are hedged at once). A read that never ends holds its thread and nothing else: the end of
the process (``reading``) or of the loader (``workers=0``) does not wait for it.

Read-ahead: a worker that already holds its next task starts that batch's loads (``start_ahead``) right
after the current batch's. Their pullers queue behind the current batch's on the pool, so each thread goes
on to the next batch's samples as soon as the current batch's are all taken, and keeps reading while the
worker transforms, collates and writes the current batch. At most one batch ahead, in this process; a
process's read-ahead is dropped at a fork and cancelled by ``cancel_ahead`` (a worker's end): the reads
in progress finish, no other starts. Only loads run ahead: the next batch's transform still runs after
the current one, in the calling thread, from the generators seeded for its own number.

The generators are watched while the calling thread runs no user code (``GlobalDraws``): from the end of
the current batch's user code to the next batch's seeding (``quiet_since``, checked by ``take_ahead``),
and while it waits for a batch's loads (``pipeline``). See ``docs/design.md`` ("io_threads", "Hedged reads").
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

from . import threaded
from .hedging import ReadHedging

# Threads of the spare pool that runs the hedges (and holds the dropped copies still reading). More lets more
# stragglers run at once (a copy of a 50x straggler reads for 50 reads' time); a hedge finding none free waits.
READ_SPARE_THREADS = 4

_rules: dict[int, ReadHedging] = {}
_running = [0]  # hedged pullers at work in this process, of any batch (``reading``)
_running_lock = threading.Lock()


def rule_for(owner: object) -> ReadHedging:
    """The ``ReadHedging`` of ``owner`` (a loader's configuration) in this process; dropped with it."""
    key = id(owner)
    rule = _rules.get(key)
    if rule is None:
        rule = _rules[key] = ReadHedging()
        weakref.finalize(owner, _rules.pop, key, None)
    return rule


def reading() -> bool:
    """Whether a hedged puller is still at work in this process: after the last batch, a dropped copy still
    reading (a worker then exits at once rather than wait for its thread: ``processes/worker.py``)."""
    return _running[0] > 0


class Loads:
    """``load_one(i)`` for each of ``indices`` on the pool of ``threads``, started at once, late reads hedged
    by ``rule`` if given; ``result()`` waits for them (``docs/design.md``, "io_threads", "Hedged reads")."""

    def __init__(
        self, load_one: Callable[[int], Any], indices: list[int], threads: int, rule: ReadHedging | None = None
    ):
        n = len(indices)
        self.indices = indices
        self.samples: list[Any] = [None] * n
        self.failed_index = -1  # the index whose load raised, once ``result`` raised it
        self._load_one = load_one
        self._next = 0  # the next position to take
        self._stop_at = n  # no position from here on starts: a failure there, or cancelled (-1)
        self._failure: BaseException | None = None
        self._taken = [False] * n  # a copy of the position is in (a sample or the failure)
        self._in = 0  # positions before ``_stop_at`` that are in
        self._first = 0  # (``_hedge_due``'s) every position before it is in
        self._lock = threading.Lock()
        self._done = threading.Event()  # every position before ``_stop_at`` is in
        self._threads = threads
        self._rule = rule
        self._held = 0  # primary reads still running whose position a hedge's copy filled (their thread is held)
        if rule is not None:
            self._started = [0.0] * n  # when each position's first read started (0.0: not yet)
            self._seconds = [0.0] * n  # how long the taken read of each took
        if n == 0:
            self._done.set()
        pool = threaded.pool(threads)
        for _ in range(min(threads, n)):
            pool.submit(self._pull if rule is None else self._pull_counted, None)

    def _take_next(self) -> int | None:
        """The next position to read (the lock held), or None: none is left, or a failure stopped them."""
        position = self._next
        if position >= self._stop_at:
            return None
        self._next += 1
        return position

    def _pull(self, position: int | None) -> None:
        """A puller: read ``position`` (a hedge's) or the next one, then the next ones, until none is left or this
        puller's copy of a position was not taken."""
        hedge = position is not None
        with self._lock:
            if position is None:
                position = self._take_next()
            elif self._taken[position] or position > self._stop_at:
                return  # a hedge that waited for a thread until its position was in (or past a failure)
        load_one, indices, put = self._load_one, self.indices, self._put
        if self._rule is None:  # (the loop without clocks: ``hedge=False``)
            while position is not None:
                try:
                    sample = load_one(indices[position])
                except BaseException as exc:  # any user exception: raised by ``result`` in the calling thread
                    position = put(position, None, exc, 0.0, False)
                else:
                    position = put(position, sample, None, 0.0, False)
            return
        while position is not None:
            start = time.perf_counter()
            if not hedge:
                self._started[position] = start
            sample, failure = None, None
            try:
                sample = load_one(indices[position])
            except BaseException as exc:
                failure = exc
            position = put(position, sample, failure, time.perf_counter() - start, hedge)
            hedge = False

    def _pull_counted(self, position: int | None) -> None:
        with _running_lock:
            _running[0] += 1
        try:
            self._pull(position)
        finally:
            with _running_lock:
                _running[0] -= 1

    def _put(
        self, position: int, sample: Any, failure: BaseException | None, seconds: float, hedge: bool
    ) -> int | None:
        """Take this copy of ``position`` unless one is in already, it is past a failure (or the loads were
        cancelled), or it is a hedge's failure; then the next position for the same puller (None: it ends)."""
        with self._lock:
            if self._taken[position] or position > self._stop_at or (hedge and failure is not None):
                if self._taken[position] and not hedge:
                    self._held -= 1  # (a hedged position's primary, ending)
                return None
            self._taken[position] = True
            if failure is None:
                self.samples[position] = sample
                self._in += 1  # (``position < _stop_at``: a failure's position is taken, and nothing is past it)
            else:  # the first in the batch's order so far
                self._stop_at, self._failure = position, failure
                self._in = sum(self._taken[:position])
            if self._rule is not None:
                self._seconds[position] = seconds
                self._held += hedge
            if self._in >= self._stop_at:
                self._done.set()
                return None
            position = self._next  # the next one for this puller (``_take_next``, inline: once per sample)
            if position >= self._stop_at:
                return None
            self._next += 1
            return position

    def result(self) -> list[Any]:
        """The samples in the batch's order, once all are loaded; or what the first failed load (in the
        batch's order) raised, with its index in ``failed_index``, once every load before it is in."""
        try:
            if self._rule is None or not self._rule.active():
                self._done.wait()
            else:
                hedged: set[int] = set()
                while not self._done.wait(self._hedge_due(self._rule, hedged)):
                    pass
        except BaseException:  # interrupted while waiting: start no more loads
            self.cancel()
            raise
        failure, self._failure = self._failure, None  # (its traceback holds this object: no cycle kept)
        if failure is not None:
            self.failed_index = self.indices[self._stop_at]
            raise failure
        if self._rule is not None:
            self._measured(self._rule)
        if self._held:  # a thread of the pool may never come back: the next batches' loads get a new pool
            threaded.replace_pool(self._threads)
        samples, self.samples = self.samples, []  # a dropped copy still reading keeps none of them alive
        return samples

    def _hedge_due(self, rule: ReadHedging, hedged: set[int]) -> float | None:
        """Start the hedges due among the reads in flight; return how long to sleep until the next is (None: no
        read will be hedged, sleep until the batch is in)."""
        margin = rule.margin()
        if margin is None:
            return None
        now = time.perf_counter()
        soonest = None
        while self._first < self._next and self._taken[self._first]:
            self._first += 1
        for position in range(self._first, self._next):
            started = self._started[position]
            if self._taken[position] or position in hedged or not started:
                continue
            deadline = rule.deadline(started)
            if deadline is None:
                return None  # the cap is reached
            if deadline <= now:
                if rule.take():
                    hedged.add(position)
                    threaded.pool(READ_SPARE_THREADS, "prefetch-hedge").submit(self._pull_counted, position)
                continue
            soonest = deadline if soonest is None else min(soonest, deadline)
        return margin if soonest is None else soonest - now

    def _measured(self, rule: ReadHedging) -> None:
        """Each read's time into ``rule`` while it hedges; else the batch's reads as a whole (their mean)."""
        if rule.active():
            for seconds in self._seconds:
                rule.measured(seconds)
        else:
            rule.measured_batch(sum(self._seconds), len(self._seconds), 1)

    def cancel(self) -> None:
        """Start no more loads; those in progress finish, their samples dropped."""
        with self._lock:
            self._stop_at = -1


class _Ahead(NamedTuple):
    batch: int
    indices: list[int]
    loads: Loads


_ahead: _Ahead | None = None
# The generators when the calling thread last finished a batch's user code with loads in flight.
_quiet_since: threaded.GlobalDraws | None = None


def _forget() -> None:
    global _ahead, _quiet_since
    _ahead = _quiet_since = None  # the pool's threads are not in a forked child
    _rules.clear()  # nor are the parent's reads the child's
    _running[0] = 0


os.register_at_fork(after_in_child=_forget)


def start_ahead(
    batch: int, load_one: Callable[[int], Any], indices: list[int], threads: int, rule: ReadHedging | None = None
) -> None:
    """Start batch ``batch``'s loads now, for the next ``take_ahead``; a read-ahead not taken is cancelled."""
    global _ahead
    cancel_ahead()
    _ahead = _Ahead(batch, indices, Loads(load_one, indices, threads, rule))


def take_ahead(
    batch: int, indices: list[int], words: tuple[str, str] = ("io_threads > 1", "io_threads=1")
) -> Loads | None:
    """Batch ``batch``'s loads if they were started ahead (any other read-ahead is cancelled). Raises
    ``RuntimeError`` if a generator moved since the calling thread's last user code ended: only a load
    can have drawn (``words``: ``GlobalDraws.check``'s)."""
    global _ahead, _quiet_since
    ahead, since = _ahead, _quiet_since
    _ahead = _quiet_since = None
    if ahead is not None and (ahead.batch != batch or ahead.indices != indices):
        ahead.loads.cancel()
        ahead = None
    try:
        if since is not None:
            since.check(*words)
    except BaseException:
        if ahead is not None:
            ahead.loads.cancel()
        raise
    return ahead.loads if ahead is not None else None


def quiet_now() -> None:
    """The calling thread's user code for a batch has ended: watch the generators from here while loads
    are in flight."""
    global _quiet_since
    _quiet_since = threaded.GlobalDraws() if _ahead is not None else None


def cancel_ahead() -> None:
    """Cancel the read-ahead, if any: no more of its loads start."""
    global _ahead, _quiet_since
    if _ahead is not None:
        _ahead.loads.cancel()
    _ahead = _quiet_since = None
