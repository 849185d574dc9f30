"""The consumer's engine: what ``Loader``'s generator pulls batches from.

``Engine`` drives one run of an executor (``executor.py``: where batches are made) and owns what
the user sees, whatever the executor: the reorder buffer (batches strictly by number, so the
stream is the same for any number of workers), the ``timeout`` clock, the thread tuner,
``workers="auto"`` (``autoscaler``), statistics, and closing -- from any thread, at exit, never in
a forked child. ``close()`` from another thread wakes a ``next_batch`` blocked in ``run.wait`` (it raises
``LoaderClosedError``), waits for it to leave, then stops the run.

``InlineEngine`` (``workers=0``) makes each batch in the calling process with the same
pipeline, restoring the caller's global random state after each batch.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import multiprocess.util  # noqa: F401 - its atexit hook must be registered before ours (below)

from ._stepback import NiceTrial, StepBack, may_lower_nice, own_nice
from ._tuning import ThreadTuner
from .autoscaler import AutoScaler
from .core import readahead, threaded
from .core.aliasing import SourceMemory
from .core.config import DEFAULT_WORKER_NICE, LoaderConfig
from .core.pipeline import UserCodeRaised, make_numbered_batch
from .core.reorder import ReorderBuffer
from .errors import LoaderClosedError, annotate
from .executor import Executor, Made, Result, Run, Unmade
from .ipc.channel import WakePipe
from .stats import Stats, StatsRecorder

# How long the engine waits in one go before it rechecks its clocks (and the executor its processes).
POLL_S = 0.5

# How long close() waits for a next() that another thread is blocked in to notice it.
BUSY_WAIT_S = 2.0

live_engines: weakref.WeakSet[Engine] = weakref.WeakSet()  # the engines running in this process


def close_all_engines() -> None:
    """Stop every running engine (at interpreter exit, before multiprocess joins its children, which
    would otherwise wait forever for a coordinator nobody told to stop)."""
    for engine in list(live_engines):
        engine.close()


# atexit runs hooks last-in, first-out: ours (registered after multiprocess was imported) runs first.
atexit.register(close_all_engines)


def _forget_engines_in_forked_child() -> None:
    """In a child forked by user code, the parent's engines are the parent's: forget them, so that nothing
    at this process's exit touches them -- neither our atexit hook nor multiprocess's, which would try to
    join the parent's coordinators (they are in its list of children, copied by the fork)."""
    for engine in list(live_engines):
        engine.forget_in_forked_child()
    live_engines.clear()


os.register_at_fork(after_in_child=_forget_engines_in_forked_child)


class InlineEngine:
    """``workers=0``: every batch made in the calling process, same output as the workers'."""

    def __init__(self, config: LoaderConfig, start: int):
        self.config = config
        self.order = config.order
        self.position = start
        self.recorder = StatsRecorder(config.provenance)
        self.source_memory = SourceMemory(config.sources)  # batches must not alias the sources

    def next_batch(self) -> Any:
        batch_number = self.position
        indices = self.order.batch_indices(batch_number)
        started = time.perf_counter()
        try:
            batch, _ = make_numbered_batch(self.config, batch_number, indices, private=self.source_memory)
        except UserCodeRaised as error:
            raise annotate(error.original, error.failure.where, batch_number) from error.original.__cause__
        self.position += 1
        self.recorder.delivered(len(indices), time.perf_counter() - started, 0, None, None)
        return batch

    def stats(self) -> Stats:
        if self.config.hedge:
            self.recorder.hedged_reads = readahead.rule_for(self.config).hedges
        return self.recorder.snapshot([], None)

    def close(self) -> None:
        # io_threads' threads: none left running after the loader (core/threaded.py); but a dropped copy of a
        # hedged read still reading (it may never end) is not waited for (core/readahead.py)
        threaded.end_pools(wait=not readahead.reading())


class Engine:
    """The consumer's end of any executor, from batch ``start`` on."""

    def __init__(self, config: LoaderConfig, start: int, executor: Executor):
        self.config = config
        self.order = config.order
        self.reorder: ReorderBuffer[Result] = ReorderBuffer(start)
        self.recorder = StatsRecorder(config.provenance)
        self.closed = False
        self.owner_pid = os.getpid()  # a forked child's copy of this engine must leave it alone
        self.busy = threading.Lock()  # held by next_batch: close() from another thread waits for it
        self.close_lock = threading.Lock()
        self.wake = WakePipe()  # close() in another thread wakes a blocked next_batch through it
        try:
            self.run: Run = executor.start(config, start, self.wake)
        except BaseException:
            self.wake.close()
            raise
        # Only once the executor runs: an engine that failed to start has nothing to give back.
        self.tuner = ThreadTuner.start(config.train_threads, config.workers)  # None: nothing to tune
        self.stepback = _nice_chooser(config, self.worker_pids)  # worker_nice="auto"; None: a fixed value
        self.auto = _auto_scaler(config, self.run)  # None: a fixed count
        live_engines.add(self)

    @property
    def position(self) -> int:
        return self.reorder.position

    def _file(self, results: list[Result]) -> None:
        for result in results:
            if not self.reorder.put(result) and isinstance(result, Made):
                self.run.drop(result)  # a duplicate of a redone batch

    def _wait_for_next(self) -> float:
        """Block until the next batch is here; return the seconds waited.

        With ``timeout`` the clock is the consumer's own, and starts once the executor's workers are
        up: at the deadline the executor is told the batch is late, and answers with its failure. The
        start-up before that is bounded by the executor (processes: ``StartTimeoutError``).
        """
        started = time.perf_counter()
        timeout_s = self.config.timeout
        deadline = started + timeout_s if timeout_s is not None and self.run.started else None
        told = False  # the executor has been told the batch is late
        while not self.reorder.ready():
            wait_s = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.perf_counter()))
            results = self.run.wait(wait_s)
            if self.wake.woken:
                raise LoaderClosedError(
                    f"the loader was closed (from another thread, or at exit) while waiting for batch {self.position}"
                )
            self._file(results)
            if self.reorder.ready():
                break
            now = time.perf_counter()
            if deadline is None and timeout_s is not None and not told and self.run.started:
                deadline = now + timeout_s  # the executor's start-up does not count against a batch
            elif deadline is not None and now >= deadline:
                self.run.late(self.position)
                told, deadline = True, None
        return time.perf_counter() - started

    def interrupt(self) -> None:
        """Wake a ``next_batch`` blocked in another thread: it raises ``LoaderClosedError`` (any thread)."""
        self.wake.wake()

    def next_batch(self) -> Any:
        """The next batch in order (blocks until it is ready)."""
        with self.busy:
            if self.wake.woken:
                raise LoaderClosedError("the loader was closed (from another thread, or at exit)")
            return self._next_batch()

    def _next_batch(self) -> Any:
        # Credits go back when the user asks for the next batch, not when the last one was yielded:
        # the batch the user works on keeps its place in the window (see docs/design.md).
        self.run.advance(self.position)
        fill = len(self.reorder)
        self._file(self.run.wait(0))
        self._tick_choosers(len(self.reorder))
        waited = self._wait_for_next() if not self.reorder.ready() else 0.0
        result = self.reorder.take()
        if isinstance(result, Unmade):
            self.run.advance(self.position)
            raise result.error
        batch = self.run.open(result)
        self.recorder.delivered(self.order.batch_length(result.batch), waited, fill, result.timings, result.worker)
        if self.auto is not None and not self._measuring():
            # one thing at a time: the worker count holds while a window is timed at one priority or thread count
            self.auto.tick(self.recorder.batches, self.recorder.wait_s, self._busy_s, len(self.reorder))
        return batch

    def _measuring(self) -> bool:
        return (self.tuner is not None and self.tuner.measuring) or (
            self.stepback is not None and self.stepback.measuring
        )

    def _tick_choosers(self, ready: int) -> None:
        """The workers' priority first, then the training threads, neither while ``workers="auto"`` times a park:
        one setting is timed at a time (``_compare.Trial``)."""
        tuner, stepback = self.tuner, self.stepback
        if self.auto is not None and self.auto.measuring:
            return  # a park on trial (workers="auto") is timed alone
        # StepBack only watches the waiting (it ticks always); NiceTrial times windows, never during the tuner's
        waits = stepback is not None and stepback.times_windows and tuner is not None and tuner.measuring
        changed = stepback is not None and not waits and stepback.tick(ready, self.recorder.wait_s)
        if changed and tuner is not None:
            tuner.reconsider()  # measured at the workers' old priority
        if tuner is not None and not (stepback is not None and stepback.measuring):
            tuner.tick(ready)

    def _busy_s(self) -> float:
        return sum(self.recorder.busy_s.values())

    def worker_pids(self) -> list[int]:
        """The workers on this machine (whose processes can be looked up here)."""
        return [worker.pid for worker in self.run.workers() if worker.here]

    def helper_pid(self) -> int | None:
        return self.run.helper_pid()

    def decisions(self) -> tuple[str, ...]:
        """What the engine decided about sharing the cores with the training step, and why."""
        made = []
        if self.stepback is not None and self.stepback.decision:
            made.append(self.stepback.decision)
        elif isinstance(self.config.worker_nice, int) and self.config.worker_nice:
            made.append(f"workers at nice +{self.config.worker_nice}: the training step goes first (worker_nice)")
        if self.tuner is not None and self.tuner.decision:
            made.append(self.tuner.decision)
        if self.auto is not None:
            made.append(self.auto.describe())
        elif self.config.auto_workers and self.config.workers > 1:
            made.append(f"workers='auto' is the budget with this executor: all {self.config.workers} workers work")
        return tuple(made)

    def stats(self) -> Stats:
        self.recorder.restarts = self.run.restarts
        self.recorder.hedges = getattr(self.run, "hedges", 0)  # an executor that hedges (processes) counts them
        self.recorder.hedged_reads = getattr(self.run, "hedged_reads", 0)
        nodes = {worker.pid: worker.node for worker in self.run.workers() if worker.node is not None}
        stats = self.recorder.snapshot(self.worker_pids(), self.helper_pid(), self.decisions(), nodes)
        if self.auto is None:
            return stats
        workers, window = self.auto.setting
        return replace(stats, auto_workers=workers, auto_window=window, auto_changes=tuple(self.auto.changes))

    def forget_in_forked_child(self) -> None:
        """In a child forked from the owner: let go of this process's copies only (see ``live_engines``)."""
        self.run.forget()

    def close(self) -> None:
        """Stop the executor; idempotent, from any thread.

        A ``next_batch`` blocked in another thread is woken first (it raises ``LoaderClosedError``)
        and waited for. In a process forked from the one that made the engine, it does nothing:
        the executor's processes and segments are the parent's.
        """
        if os.getpid() != self.owner_pid:
            return
        self.interrupt()
        with self.close_lock:
            if self.closed:
                return
            acquired = self.busy.acquire(timeout=BUSY_WAIT_S)
            try:
                self._shut_down()
            finally:
                if acquired:
                    self.busy.release()

    def _shut_down(self) -> None:
        self.closed = True
        live_engines.discard(self)
        if self.tuner is not None:
            self.tuner.release()  # from another thread: given back in the loop's thread (see _tuning)
        try:
            self.run.stop()
        finally:
            self.wake.close()
            self.reorder.clear()


def _nice_chooser(config: LoaderConfig, pids: Callable[[], list[int]]) -> NiceTrial | StepBack | None:
    """``worker_nice="auto"``: the loop's rate decides where the workers may come back level once stepped back
    (``NiceTrial``), its waiting decides elsewhere (``StepBack``, which steps back once and for good)."""
    if config.worker_nice != "auto":
        return None
    if may_lower_nice(own_nice()):
        return NiceTrial(DEFAULT_WORKER_NICE, pids)
    return StepBack(DEFAULT_WORKER_NICE, pids)


def _auto_scaler(config: LoaderConfig, run: Run) -> AutoScaler | None:
    """``workers="auto"`` on a run that can resize (``processes``) with two workers or more; None otherwise (Ray:
    the budget, all working; one worker: nothing to decide)."""
    resize = getattr(run, "resize", None)
    if not config.auto_workers or resize is None or config.workers < 2:
        return None
    return AutoScaler(config.workers, config.prefetch, min(config.credit_step + 1, config.prefetch), resize)
