"""A batch's loads on the ``io_threads`` pool (``Loads``), and the next batch's loads started ahead.

``Loads``: ``min(threads, n)`` pullers on the process's pool (``threaded.pool``), each taking the batch's
next position until none is left, so a thread goes on to another sample as soon as its read is done, and
a batch costs a hand-off per thread rather than per sample. The samples land at their positions; a load
that raised fails the batch, for the first such position in the batch's order (positions are taken in
order, and none past a failed one is started).

Read-ahead: a worker that already holds its next task starts that batch's loads (``start_ahead``) right
after the current batch's. Their pullers queue behind the current batch's on the pool, so each thread goes
on to the next batch's samples as soon as the current batch's are all taken, and keeps reading while the
worker transforms, collates and writes the current batch. At most one batch ahead, in this process; a
process's read-ahead is dropped at a fork and cancelled by ``cancel_ahead`` (a worker's end): the reads
in progress finish, no other starts. Only loads run ahead: the next batch's transform still runs after
the current one, in the calling thread, from the generators seeded for its own number.

The generators are watched while the calling thread runs no user code (``GlobalDraws``): from the end of
the current batch's user code to the next batch's seeding (``quiet_since``, checked by ``take_ahead``),
and while it waits for a batch's loads (``pipeline``). See ``docs/design.md`` ("io_threads").
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from . import threaded


class Loads:
    """``load_one(i)`` for each of ``indices`` on the pool of ``threads``, started at once; ``result()``
    waits for them (``docs/design.md``, "io_threads")."""

    def __init__(self, load_one: Callable[[int], Any], indices: list[int], threads: int):
        self.indices = indices
        self.samples: list[Any] = [None] * len(indices)
        self.failed_index = -1  # the index whose load raised, once ``result`` raised it
        self._load_one = load_one
        self._positions = iter(range(len(indices)))
        self._stop_at = len(indices)  # no position from here on starts: a failure there, or cancelled
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        self._pullers = min(threads, len(indices))
        self._done = threading.Event()
        pool = threaded.pool(threads)
        for _ in range(self._pullers):
            pool.submit(self._pull)

    def _pull(self) -> None:
        try:
            while True:
                with self._lock:
                    position = next(self._positions, self._stop_at)
                    if position >= self._stop_at:
                        return
                try:
                    self.samples[position] = self._load_one(self.indices[position])
                except BaseException as exc:  # any user exception: raised by ``result`` in the calling thread
                    with self._lock:
                        if position < self._stop_at:
                            self._stop_at, self._failure = position, exc
                    return
        finally:
            with self._lock:
                self._pullers -= 1
                if self._pullers == 0:
                    self._done.set()

    def result(self) -> list[Any]:
        """The samples in the batch's order, once all are loaded; or what the first failed load (in the
        batch's order) raised, with its index in ``failed_index``."""
        try:
            self._done.wait()
        except BaseException:  # interrupted while waiting: start no more loads
            self.cancel()
            raise
        failure, self._failure = self._failure, None  # (its traceback holds this object: no cycle kept)
        if failure is not None:
            self.failed_index = self.indices[self._stop_at]
            raise failure
        return self.samples

    def cancel(self) -> None:
        """Start no more loads; those in progress finish."""
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


os.register_at_fork(after_in_child=_forget)


def start_ahead(batch: int, load_one: Callable[[int], Any], indices: list[int], threads: int) -> None:
    """Start batch ``batch``'s loads now, for the next ``take_ahead``; a read-ahead not taken is cancelled."""
    global _ahead
    cancel_ahead()
    _ahead = _Ahead(batch, indices, Loads(load_one, indices, threads))


def take_ahead(batch: int, indices: list[int]) -> Loads | None:
    """Batch ``batch``'s loads if they were started ahead (any other read-ahead is cancelled). Raises
    ``RuntimeError`` if a generator moved since the calling thread's last user code ended: only a load
    can have drawn."""
    global _ahead, _quiet_since
    ahead, since = _ahead, _quiet_since
    _ahead = _quiet_since = None
    if ahead is not None and (ahead.batch != batch or ahead.indices != indices):
        ahead.loads.cancel()
        ahead = None
    try:
        if since is not None:
            since.check()
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
