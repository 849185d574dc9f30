"""The consumer side: the engines that ``Loader``'s generator pulls batches from.

``ProcessEngine`` starts the coordinator (which starts the workers), receives
``BatchReady``/``BatchFailed`` in completion order, keeps them in a reorder buffer
and hands them out strictly by batch number. Each yielded batch's arrays view its
shared-memory slot through a per-batch *lease* (see ``_shm``); when the user drops
the batch, a weakref callback on the lease puts the slot on ``released``, and the
``Consumed`` message sent when the user next asks for a batch returns it. If the
user keeps ``prefetch`` leased batches alive, further batches are copied out of
their slot instead, so holding batches never starves the pool (no deadlock) and
the number of segments stays bounded.

Its writes to the coordinator go through an ``Outbox`` (never blocking); a write that
finds the coordinator gone is reported as ``CoordinatorDiedError``. ``timeout`` is kept
on the consumer's own clock: a coordinator that does not act on a late batch within
``COORDINATOR_ANSWER_S`` (stopped, stuck) is killed and reported. An engine belongs to
the process that made it: in a forked child it does nothing at all. ``close()`` may
come from any thread: it wakes a ``next_batch`` blocked in another thread (which
raises ``LoaderClosedError``), waits for it to leave, then shuts down.

``InlineEngine`` (``workers=0``) makes each batch in the calling process with the
same pipeline, restoring the caller's global random state after each batch.
"""

from __future__ import annotations

import os
import selectors
import threading
import time
import weakref
from collections import deque
from dataclasses import replace
from typing import Any

import multiprocess
import psutil

from ._lifecycle import WakePipe, live_engines
from ._tuning import ThreadTuner
from .collate import SourceMemory
from .config import LoaderConfig
from .core import rng
from .core.pipeline import BatchError, make_batch, uses_randomness
from .errors import (
    CoordinatorDiedError,
    CoordinatorTimeoutError,
    LoaderClosedError,
    WorkerDiedError,
    WorkerTimeoutError,
    annotate,
    describe_exit,
)
from .processes.channel import Outbox, PipeReader
from .processes.coordinator import coordinator_main, ship_config
from .processes.lifetime import COORDINATOR_JOIN_TIMEOUT_S, sigint_ignored, wait_ended
from .processes.messages import (
    BatchFailed,
    BatchReady,
    Consumed,
    CoordinatorFailed,
    CoordinatorReady,
    FailureKind,
    Lost,
    SegmentRef,
    Stop,
    TimedOut,
    WorkerLost,
    encode,
)
from .processes.shm import SlotReader, claim_prefix, remove_stale_segments, share_sources
from .processes.worker import worker_main
from .stats import Stats, StatsRecorder

# How long the consumer waits in one go before checking the coordinator is alive.
COORDINATOR_POLL_S = 0.5

# With ``timeout``: how long the coordinator may take to act on a late batch (kill its worker
# and fail it) before the consumer decides the coordinator itself is stuck or stopped.
COORDINATOR_ANSWER_S = 0.5

# How long close() waits for a next() that another thread is blocked in to notice it.
BUSY_WAIT_S = 2.0

# What a selector key's data says the ready descriptor is.
_RESULTS, _COORDINATOR_EXIT, _WAKE, _CONTROL_WRITABLE = "results", "coordinator exit", "wake", "control writable"


class _Leases:
    """The slots whose batch the user still holds, and those given back since the last report.

    A weak reference with a callback on each batch's lease array: when the user drops
    the last array of a batch, the callback (in whatever thread drops it) moves the slot
    to ``released``. Both steps are single dict/deque operations, atomic under the GIL.
    """

    def __init__(self) -> None:
        self.held: dict[int, tuple[weakref.ref[Any], int, SegmentRef | None]] = {}
        self.released: deque[tuple[int, SegmentRef | None]] = deque()

    def add(self, lease: Any, slot: int, segment: SegmentRef | None) -> None:
        ref = weakref.ref(lease, self._dropped)
        self.held[id(ref)] = (ref, slot, segment)

    def _dropped(self, ref: weakref.ref[Any]) -> None:
        entry = self.held.pop(id(ref), None)
        if entry is not None:
            self.released.append((entry[1], entry[2]))

    def __len__(self) -> int:
        return len(self.held)


class InlineEngine:
    """``workers=0``: every batch made in the calling process, same output as the workers'."""

    def __init__(self, config: LoaderConfig, start: int):
        self.config = config
        self.order = config.order
        self.position = start
        self.recorder = StatsRecorder()
        self.randomness = uses_randomness(config)
        self.source_memory = SourceMemory(config.sources)  # batches must not alias the sources

    def next_batch(self) -> Any:
        batch_number = self.position
        indices = self.order.batch_indices(batch_number)
        started = time.perf_counter()
        try:
            if self.randomness:
                with rng.seeded_in_caller(self.config.seed, batch_number):
                    batch, _ = make_batch(self.config, indices, private=self.source_memory)
            else:
                batch, _ = make_batch(self.config, indices, private=self.source_memory)
        except BatchError as error:
            raise annotate(error.original, error.failure.where, batch_number) from error.original.__cause__
        self.position += 1
        self.recorder.delivered(len(indices), time.perf_counter() - started, 0, None, None)
        return batch

    def stats(self) -> Stats:
        return self.recorder.snapshot([], None)

    def close(self) -> None:
        pass


class ProcessEngine:
    """The consumer's end of the process pipeline, from batch ``start`` on."""

    def __init__(self, config: LoaderConfig, start: int):
        self.config = config
        self.order = config.order
        self.position = start
        self.sent_position = start
        self.credit_step = config.credit_step
        self.ready: dict[int, BatchReady | BatchFailed] = {}
        self.reader = SlotReader()
        self.leases = _Leases()
        self.released = self.leases.released
        self.reported_segments: dict[int, SegmentRef] = {}  # each slot's segment as last told
        self.recorder = StatsRecorder()
        self.closed = False
        self.coordinator_ready = False  # until it says its workers are started
        self.owner_pid = os.getpid()  # a forked child's copy of this engine must leave it alone
        self.busy = threading.Lock()  # held by next_batch: close() from another thread waits for it
        self.close_lock = threading.Lock()
        self.wake = WakePipe()  # close() in another thread wakes a blocked next_batch through it
        self.coordinator_acts = 0  # messages from the coordinator itself: it is alive and acting
        self.tuner = ThreadTuner.start(config.train_threads, config.workers)  # None: nothing to tune
        remove_stale_segments()
        self.prefix_lock = claim_prefix()  # held until close(): marks this loader's segments as alive
        self.prefix = self.prefix_lock.prefix
        ctx = multiprocess.get_context(config.start_method)
        if ctx.get_start_method() != "fork":
            config = replace(config, sources=share_sources(config.sources, self.prefix))
        shipped = config if ctx.get_start_method() == "fork" else ship_config(config)
        control_in, self.control = ctx.Pipe(duplex=False)
        self.results, results_out = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=coordinator_main,
            args=(control_in, results_out, shipped, self.prefix, start, os.getpid(), worker_main),
            name="prefetch-coordinator",
        )
        try:
            with sigint_ignored():  # a Ctrl-C while it boots is the consumer's alone
                self.process.start()
        except BaseException:
            self.prefix_lock.release()
            raise
        finally:
            control_in.close()
            results_out.close()
        self.reader_pipe = PipeReader(self.results)
        self.control_out = Outbox(self.control)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.reader_pipe.fileno(), selectors.EVENT_READ, _RESULTS)
        self.selector.register(self.process.sentinel, selectors.EVENT_READ, _COORDINATOR_EXIT)
        self.selector.register(self.wake.fileno(), selectors.EVENT_READ, _WAKE)
        self.watching_control = False
        live_engines.add(self)

    # --- talking to the coordinator -----------------------------------------------------

    def _tell(self, message: Consumed | Lost | TimedOut | Stop) -> None:
        """Send ``message`` now or as soon as the pipe has room; never block, never a raw EPIPE."""
        try:
            self.control_out.put(encode(message))
        except OSError:  # nobody reads the control pipe any more: the coordinator is gone
            self._coordinator_died()
        self._watch_control()

    def _watch_control(self) -> None:
        """Have ``_wait_for`` wake when the control pipe has room, while messages wait for it."""
        if self.control_out.pending != self.watching_control:
            self.watching_control = self.control_out.pending
            if self.watching_control:
                self.selector.register(self.control_out.fileno(), selectors.EVENT_WRITE, _CONTROL_WRITABLE)
            else:
                self.selector.unregister(self.control_out.fileno())

    def _flush(self) -> None:
        """Return credits and released slots to the coordinator."""
        if self.position == self.sent_position and not self.released:
            return
        released = []
        while self.released:
            slot, segment = self.released.popleft()
            if segment is not None:
                if self.reported_segments.get(slot) == segment:
                    segment = None  # the coordinator has it already: a shorter message
                else:
                    self.reported_segments[slot] = segment
            released.append((slot, segment))
        self._tell(Consumed(self.position, tuple(released), len(self.leases)))
        self.sent_position = self.position

    def _drain(self) -> bool:
        """File every message waiting on the results pipe; False if there was none."""
        try:
            messages = self.reader_pipe.read_available()
        except (EOFError, OSError):
            self._coordinator_died()
        for message in messages:
            self._file(message)
        return bool(messages)

    def _coordinator_died(self) -> None:
        self.process.join(COORDINATOR_JOIN_TIMEOUT_S)
        raise CoordinatorDiedError(
            f"the coordinator process (pid {self.process.pid}) {describe_exit(self.process.exitcode)}; "
            "the loader cannot go on"
        )

    def _coordinator_unresponsive(self, batch: int) -> None:
        """The coordinator did not act on a late batch: kill it (and so its workers) and say so."""
        pid = self.process.pid
        try:
            state = psutil.Process(pid).status()
        except psutil.Error:
            state = "gone"
        workers = self._worker_processes()
        self.process.kill()
        self.process.join(COORDINATOR_JOIN_TIMEOUT_S)
        wait_ended(workers, COORDINATOR_JOIN_TIMEOUT_S)  # they die with it (PR_SET_PDEATHSIG)
        raise CoordinatorTimeoutError(
            f"batch {batch} was not ready within timeout={self.config.timeout}s, and the coordinator process "
            f"(pid {pid}, state: {state}) did not act on it within {COORDINATOR_ANSWER_S}s; it was killed "
            "and the loader cannot go on (a stopped process: SIGSTOP, Ctrl-Z or a debugger)"
        )

    def _file(self, message: Any) -> None:
        if isinstance(message, (BatchReady, BatchFailed)):
            wanted = message.batch >= self.position and message.batch not in self.ready
            if wanted:
                self.ready[message.batch] = message
            if isinstance(message, BatchFailed):
                if message.slot >= 0:  # a worker's slot with nothing in it
                    self.released.append((message.slot, None))
            elif not wanted or message.segment is None:  # a duplicate of a redone batch, or no data
                self.released.append((message.slot, message.segment))
        elif isinstance(message, WorkerLost):
            self.coordinator_acts += 1
            self.recorder.restarts += 1
            missing = tuple((b, s) for b, s in message.tasks if b >= self.position and b not in self.ready)
            self._tell(Lost(message.pid, message.exitcode, missing))
        elif isinstance(message, CoordinatorReady):
            self.coordinator_ready = True
        elif isinstance(message, CoordinatorFailed):
            raise CoordinatorDiedError("the coordinator process failed:\n" + message.traceback)

    # --- the consumer's API -------------------------------------------------------------

    def _wait_for(self, batch: int) -> float:
        """Block until ``batch`` is in the reorder buffer; return the seconds waited.

        With ``timeout``, the clock is the consumer's own: at the deadline it asks the coordinator
        to kill the worker making the batch (which then arrives as a ``BatchFailed``); if the
        coordinator does not act within ``COORDINATOR_ANSWER_S``, the coordinator is the problem.
        """
        started = time.perf_counter()
        timeout_s = self.config.timeout
        deadline = None if timeout_s is None or not self.coordinator_ready else started + timeout_s
        answer_by: float | None = None  # after TimedOut: when the coordinator must have acted
        acts = self.coordinator_acts
        while batch not in self.ready:
            wake_at = deadline if answer_by is None else answer_by
            timeout = (
                COORDINATOR_POLL_S
                if wake_at is None
                else max(0.0, min(COORDINATOR_POLL_S, wake_at - time.perf_counter()))
            )
            events = self.selector.select(timeout)
            coordinator_exited = False
            for key, _ in events:
                if key.data is _CONTROL_WRITABLE:
                    self._flush_control()
                elif key.data is _COORDINATOR_EXIT:
                    coordinator_exited = True
            if self.wake.woken:
                raise LoaderClosedError(
                    f"the loader was closed (from another thread, or at exit) while waiting for batch {batch}"
                )
            if not self._drain() and coordinator_exited:
                self._coordinator_died()
            now = time.perf_counter()
            if deadline is None and timeout_s is not None and self.coordinator_ready and answer_by is None:
                deadline = now + timeout_s  # its start-up does not count against a batch
            if batch in self.ready:
                break
            if answer_by is not None:
                if self.coordinator_acts != acts:  # it is at work on it (a worker was lost): give it time
                    acts, answer_by = self.coordinator_acts, now + COORDINATOR_ANSWER_S
                elif now >= answer_by:
                    self._coordinator_unresponsive(batch)
            elif deadline is not None and now >= deadline:
                self._tell(TimedOut(batch))
                acts, answer_by, deadline = self.coordinator_acts, now + COORDINATOR_ANSWER_S, None
        return time.perf_counter() - started

    def _flush_control(self) -> None:
        try:
            self.control_out.flush()
        except OSError:
            self._coordinator_died()
        self._watch_control()

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
        # Credits and released slots go back when the user asks for the next batch, not when
        # the last one was yielded: the batch the user works on keeps its place in the window,
        # so a loop that keeps nothing needs prefetch + 1 slots (the +1 is the previous batch,
        # still bound to the loop variable while this one is fetched).
        if self.position - self.sent_position >= self.credit_step:
            self._flush()
        fill = len(self.ready)
        self._drain()
        if self.tuner is not None:
            self.tuner.tick(len(self.ready))
        waited = self._wait_for(self.position) if self.position not in self.ready else 0.0
        message = self.ready.pop(self.position)
        self.position += 1
        if isinstance(message, BatchFailed):
            self._flush()
            raise self._error(message)
        lease_ok = len(self.leases) < self.config.prefetch
        batch, lease = self.reader.read(
            message.slot, message.segment, message.payload, message.buffers, message.arrays, lease_ok
        )
        if lease is not None:
            self.leases.add(lease, message.slot, message.segment)
        elif message.segment is not None:
            self.released.append((message.slot, message.segment))
        samples = self.order.batch_length(message.batch)
        self.recorder.delivered(samples, waited, fill, message.timings, message.pid)
        return batch

    def _error(self, message: BatchFailed) -> BaseException:
        if message.kind == FailureKind.USER_CODE:
            assert message.failure is not None
            return message.failure.to_exception(message.batch, message.indices, message.pid)
        kind = WorkerTimeoutError if message.kind == FailureKind.WORKER_TIMEOUT else WorkerDiedError
        return kind(message.message, batch=message.batch, indices=message.indices, pid=message.pid)

    def _worker_processes(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children()
        except psutil.Error:
            return []

    def worker_pids(self) -> list[int]:
        return [process.pid for process in self._worker_processes()]

    def decisions(self) -> tuple[str, ...]:
        """What the engine decided about sharing the cores with the training step, and why."""
        made = []
        if self.config.worker_nice:
            made.append(f"workers at nice +{self.config.worker_nice}: the training step goes first (worker_nice)")
        if self.tuner is not None and self.tuner.decision:
            made.append(self.tuner.decision)
        return tuple(made)

    def stats(self) -> Stats:
        return self.recorder.snapshot(self.worker_pids(), self.process.pid, self.decisions())

    def forget_in_forked_child(self) -> None:
        """In a child forked from the owner: close only this process's copy of the prefix lock's
        descriptor (its ``release`` does nothing more outside the owner), so that nothing of the
        parent's is left for this process's exit to clean up."""
        self.prefix_lock.release()

    def close(self) -> None:
        """Stop the coordinator and its workers and unlink every segment; idempotent, from any thread.

        A ``next_batch`` blocked in another thread is woken first (it raises ``LoaderClosedError``)
        and waited for. In a process forked from the one that made the engine, it does nothing:
        the coordinator, the pipes and the segments are the parent's.
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
            self.tuner.restore()
        try:
            self.control_out.put(encode(Stop()))
        except OSError:  # the coordinator is gone already
            pass
        self.process.join(COORDINATOR_JOIN_TIMEOUT_S)
        if self.process.is_alive():
            workers = self._worker_processes()
            self.process.kill()
            self.process.join(COORDINATOR_JOIN_TIMEOUT_S)
            wait_ended(workers, COORDINATOR_JOIN_TIMEOUT_S)  # they die with their parent
        self.selector.close()
        self.control.close()
        self.results.close()
        self.wake.close()
        self.ready.clear()
        self.reader.close()  # unmapped now, or when the user drops the last batch still held
        self.prefix_lock.release()  # every segment, then the lock file
