"""One start-to-stop of the ``processes`` executor, in the consumer: ``ProcessRun``.

It starts the coordinator (``launch.CoordinatorProcess``, running the entry point the template hands
it), reads ``BatchReady``/``BatchFailure``/``GiveUp`` from the shared results pipe and turns them into
the engine's ``Made``/``Unmade``, and returns credits and free slots in ``Consumed`` messages. What it
keeps (``docs/design.md``: "Who writes to whom", "Shared memory: slots and leases", "Shutdown"):

* an opened batch's arrays view its slot through a per-batch lease; the slot goes back, through
  ``core.reorder.Leases``, with the next ``Consumed`` after the user drops the batch. Past ``prefetch``
  leased batches, batches are copied out instead, so holding batches never starves the pool;
* its writes never block (an ``Outbox``); one that finds the coordinator gone is ``CoordinatorDiedError``;
* after ``late(b)`` the coordinator must act within ``COORDINATOR_ANSWER_S`` (each ``WorkerLost`` shows it
  at work and extends that), or it is killed and ``wait`` raises ``CoordinatorTimeoutError``; with
  ``timeout``, the coordinator must be ready within ``timeout`` of the start, or ``StartTimeoutError``;
* ``stop`` leaves no process and no segment: the coordinator is asked, then killed, its workers waited
  for, every segment unlinked and every descriptor closed.
"""

from __future__ import annotations

import selectors
import time
from typing import Any

from ..core.config import LoaderConfig
from ..core.hedging import Hedging
from ..core.reorder import Leases
from ..core.schedule import GiveUp
from ..errors import CoordinatorDiedError, CoordinatorTimeoutError, StartTimeoutError
from ..executor import Made, Result, Unmade, Wake, WorkerInfo
from ..ipc.channel import Outbox, PipeReader, encode
from ..ipc.segments import SegmentRef, claim_prefix, remove_stale_segments
from ..ipc.slots import SlotReader
from .launch import COORDINATOR_JOIN_TIMEOUT_S, CoordinatorProcess, Roles
from .messages import (
    BatchFailure,
    BatchReady,
    Consumed,
    CoordinatorCrashed,
    CoordinatorReady,
    Hedge,
    Hedged,
    Lost,
    Resize,
    Stop,
    TimedOut,
    WorkerLost,
    WorkersStopped,
)

# With ``timeout``: how long the coordinator may take to act on a late batch (kill its worker
# and fail it) before the consumer decides the coordinator itself is stuck or stopped.
COORDINATOR_ANSWER_S = 0.5

# What a selector key's data says the ready descriptor is (the control pipe's key holds its Outbox).
_RESULTS, _COORDINATOR_EXIT, _WAKE = "results", "coordinator exit", "wake"


class ProcessRun:
    """One start-to-stop of the ``processes`` executor, in the consumer: batches made by worker processes
    under a coordinator, delivered through shared memory."""

    def __init__(self, config: LoaderConfig, start: int, wake: Wake, roles: Roles):
        # with ``timeout``: when the coordinator must be ready; the clock starts with the user's request
        self.start_by = None if config.timeout is None else time.perf_counter() + config.timeout
        self.config = config
        self.coordinator_ready = False  # until it says its workers are started (``started``)
        self.coordinator_acts = 0  # messages from the coordinator itself: it is alive and acting
        self.answer_by: float | None = None  # after ``late``: when the coordinator must have acted
        self.acts_seen = 0  # ``coordinator_acts`` when ``answer_by`` was last set
        self.late_batch = -1
        self.restarts = 0  # workers lost and replaced
        self.worker_exits: dict[int, int | None] = {}  # after ``stop``: how each last worker ended
        self.worker_pids: tuple[int, ...] = ()  # as the coordinator last said (CoordinatorReady, WorkerLost)
        self.position = start  # the batch the consumer wants next
        self.sent_position = start  # the position the coordinator was last told
        self.delivered: set[int] = set()  # batches passed on, at or beyond ``position``
        self.hedging = Hedging() if config.hedge else None  # when to make a late batch twice (``hedge``)
        self.hedges = 0  # batches a second worker was set to make (``Hedged``), for ``stats()``
        self.hedged_reads = 0  # reads the workers started a second time (``BatchReady.hedged_reads``)
        self.reader = SlotReader()
        self.leases = Leases()  # slots the user's batches hold, and those given back since the last report
        self.reported_segments: dict[int, SegmentRef] = {}  # each slot's segment as last told
        remove_stale_segments()
        self.prefix_lock = claim_prefix()  # held until stop(): marks this loader's segments as alive
        try:
            self.coordinator = CoordinatorProcess(config, start, self.prefix_lock.prefix, roles)
        except BaseException:
            self.prefix_lock.release()
            raise
        self.reader_pipe = PipeReader(self.coordinator.results)
        self.selector = selectors.DefaultSelector()
        self.control_out = Outbox(self.coordinator.control, selector=self.selector)
        self.selector.register(self.reader_pipe.fileno(), selectors.EVENT_READ, _RESULTS)
        self.selector.register(self.coordinator.ended_fd, selectors.EVENT_READ, _COORDINATOR_EXIT)
        self.selector.register(wake.fileno(), selectors.EVENT_READ, _WAKE)

    @property
    def started(self) -> bool:
        return self.coordinator_ready

    # --- talking to the coordinator -----------------------------------------------------

    def _tell(self, message: Consumed | Lost | TimedOut | Hedge | Resize) -> None:
        """Send ``message`` now or as soon as the pipe has room; never block, never a raw EPIPE."""
        try:
            self.control_out.put(encode(message))
        except OSError:  # nobody reads the control pipe any more: the coordinator is gone
            self._coordinator_died()

    def _flush_control(self) -> None:
        try:
            self.control_out.flush()
        except OSError:
            self._coordinator_died()

    def advance(self, position: int) -> None:
        """Credits and released slots go back every ``credit_step`` batches the consumer takes."""
        for taken in range(self.position, position):
            self.delivered.discard(taken)
        self.position = max(self.position, position)
        if self.hedging is not None:
            self.hedging.asked(self.position)
        if self.position - self.sent_position >= self.config.credit_step:
            self._report()

    def resize(self, workers: int, window: int) -> None:
        """``workers="auto"``: the coordinator gives tasks to ``workers`` workers, with ``window`` batches ahead."""
        self._tell(Resize(workers, window))

    def _report(self) -> None:
        """Return credits and released slots to the coordinator."""
        released = self.leases.given_back()
        if self.position == self.sent_position and not released:
            return
        for position, (slot, segment) in enumerate(released):
            if segment is not None and self.reported_segments.get(slot) == segment:
                released[position] = (slot, None)  # the coordinator has it already: a shorter message
            elif segment is not None:
                self.reported_segments[slot] = segment
        self._tell(Consumed(self.position, tuple(released), len(self.leases)))
        self.sent_position = self.position

    # --- results ------------------------------------------------------------------------

    def wait(self, seconds: float) -> list[Result]:
        """What arrived within ``seconds`` (0: only what is there already)."""
        coordinator_exited = False
        if seconds > 0:
            for deadline in (self.answer_by, self.start_by, self._hedge_by()):
                if deadline is not None:
                    seconds = max(0.0, min(seconds, deadline - time.perf_counter()))
            for key, _ in self.selector.select(seconds):
                if key.data is self.control_out:
                    self._flush_control()
                elif key.data is _COORDINATOR_EXIT:
                    coordinator_exited = True
        results = self._drain()
        if not results and coordinator_exited:
            self._coordinator_died()
        if self.answer_by is not None:
            self._check_answer()
        if self.start_by is not None and time.perf_counter() >= self.start_by:
            self._start_timed_out()
        if self._hedge_by() is not None:
            self._hedge()
        return results

    def _hedge_by(self) -> float | None:
        """When the batch the loop waits for is late enough to hedge (``hedge=True``), or None."""
        if self.hedging is None or self.position in self.delivered:
            return None
        return self.hedging.deadline()

    def _hedge(self) -> None:
        assert self.hedging is not None
        batch = self.hedging.due()
        if batch is not None:
            self._tell(Hedge(batch))

    def _drain(self) -> list[Result]:
        try:
            messages = self.reader_pipe.read_available()
        except (EOFError, OSError):
            self._coordinator_died()
        results = []
        for message in messages:
            result = self._result(message)
            if result is not None:
                results.append(result)
                if result.batch >= self.position:
                    self.delivered.add(result.batch)
                if self.hedging is not None and isinstance(result, Made):
                    self.hedging.measured(sum(result.timings))
        return results

    def _result(self, message: Any) -> Result | None:
        if isinstance(message, BatchReady):
            self.hedged_reads += message.hedged_reads
            return Made(message.batch, message.timings, message.pid, message)
        if isinstance(message, BatchFailure):
            self.leases.give_back(message.slot, None)  # nothing in it
            error = message.failure.to_exception(message.batch, message.indices, message.pid)
            return Unmade(message.batch, error)
        if isinstance(message, GiveUp):
            self.coordinator_acts += 1
            indices = self.config.order.batch_indices(message.batch).tolist()
            return Unmade(message.batch, message.error(indices, self.config.timeout, self.config.retries))
        if isinstance(message, WorkerLost):
            self.coordinator_acts += 1
            self.restarts += 1
            missing = tuple((b, s) for b, s in message.tasks if b >= self.position and b not in self.delivered)
            self._tell(Lost(message.pid, message.exitcode, missing))
            self.worker_pids = message.workers
        elif isinstance(message, Hedged):
            self.hedges += 1
        elif isinstance(message, CoordinatorReady):
            self.coordinator_ready = True
            self.start_by = None
            self.worker_pids = message.workers
        elif isinstance(message, CoordinatorCrashed):
            raise CoordinatorDiedError("the coordinator process failed:\n" + message.traceback)
        return None

    def open(self, made: Made) -> Any:
        ready: BatchReady = made.payload
        lease_ok = len(self.leases) < self.config.prefetch
        batch, lease = self.reader.read(ready.slot, ready.layout, lease_ok)
        if lease is not None:
            self.leases.add(lease, ready.slot, ready.layout.segment)
        else:  # copied out, or nothing was in the slot: free at once
            self.leases.give_back(ready.slot, ready.layout.segment)
        return batch

    def drop(self, made: Made) -> None:
        ready: BatchReady = made.payload
        self.leases.give_back(ready.slot, ready.layout.segment)

    # --- a late batch, a dead or stuck coordinator --------------------------------------

    def late(self, batch: int) -> None:
        self._tell(TimedOut(batch))
        self.late_batch = batch
        self.acts_seen, self.answer_by = self.coordinator_acts, time.perf_counter() + COORDINATOR_ANSWER_S

    def _check_answer(self) -> None:
        assert self.answer_by is not None
        if self.late_batch not in self.delivered and self.late_batch >= self.position:
            if self.coordinator_acts != self.acts_seen:  # at work on it (a worker was lost): give it time
                self.acts_seen, self.answer_by = self.coordinator_acts, time.perf_counter() + COORDINATOR_ANSWER_S
            elif time.perf_counter() >= self.answer_by:
                self._coordinator_unresponsive(self.late_batch)
        else:
            self.answer_by = None

    def _coordinator_died(self) -> None:
        self.coordinator.join(COORDINATOR_JOIN_TIMEOUT_S)
        raise CoordinatorDiedError(self.coordinator.died_text())

    def _coordinator_unresponsive(self, batch: int) -> None:
        """The coordinator did not act on a late batch: kill it (and so its workers) and say so."""
        state = self.coordinator.state()
        self.coordinator.kill()
        raise CoordinatorTimeoutError(
            f"batch {batch} was not ready within timeout={self.config.timeout}s, and the coordinator process "
            f"(pid {self.coordinator.pid}, state: {state}) did not act on it within {COORDINATOR_ANSWER_S}s; it "
            "was killed and the loader cannot go on (a stopped process: SIGSTOP, Ctrl-Z or a debugger)"
        )

    def _start_timed_out(self) -> None:
        """``timeout`` passed since the first request and the coordinator is not ready: kill it, say why."""
        state = self.coordinator.state()
        self.coordinator.kill()
        self.start_by = None
        raise StartTimeoutError(self.coordinator.start_timeout_text(state))

    # --- figures and the end ------------------------------------------------------------

    def workers(self) -> list[WorkerInfo]:
        """The workers as the coordinator last listed them: no scan of /proc, so ``stats()`` costs the same
        however many processes the machine runs."""
        return [WorkerInfo(pid) for pid in self.worker_pids]

    def helper_pid(self) -> int | None:
        return self.coordinator.pid

    def forget(self) -> None:
        """In a child forked from the owner: close only this process's copy of the prefix lock's
        descriptor, and take the parent's coordinator off multiprocess's list of this process's
        children (copied by the fork; its exit would try to join it)."""
        self.coordinator.forget()
        self.prefix_lock.release()

    def _received(self) -> tuple[int, ...]:
        """Every result at or beyond ``position`` that has arrived, read or not (for ``Stop``)."""
        try:
            arrived = self.reader_pipe.read_available()
        except (EOFError, OSError):
            arrived = []
        got = set(self.delivered)
        got.update(m.batch for m in arrived if isinstance(m, (BatchReady, BatchFailure)) and m.batch >= self.position)
        for message in arrived:
            if isinstance(message, WorkersStopped):  # the coordinator stopped already (it failed)
                self.worker_exits = dict(message.exits)
        return tuple(sorted(got))

    def _last_words(self) -> None:
        """Read what the coordinator said before it ended: how its workers ended (``WorkersStopped``)."""
        while True:
            try:
                arrived = self.reader_pipe.read_available()
            except (EOFError, OSError):
                return
            if not arrived:
                return
            for message in arrived:
                if isinstance(message, WorkersStopped):
                    self.worker_exits = dict(message.exits)

    def stop(self) -> None:
        """``Stop`` to the coordinator, with the batches received (its idle workers stop on their own,
        a worker still making a batch is killed; then it unlinks the segments); after
        ``COORDINATOR_JOIN_TIMEOUT_S`` it is killed, its workers die with it, and the segments are
        unlinked here: mappings the user's batches still view go when those batches do."""
        stop = encode(Stop(self.position, self._received()))
        self.coordinator.stop(self.control_out, stop)
        self._last_words()
        self.control_out.close()
        self.selector.close()
        self.coordinator.close()
        self.reader.close()  # unmapped now, or when the user drops the last batch still held
        self.prefix_lock.release()  # every segment, then the lock file
