"""The coordinator process: owns the order, dispatches index batches, supervises workers.

It alone decides what is made next (a ``core.schedule.Schedule``: the credit window, the
slots as its places, redoing lost batches, the give-ups) and keeps each worker's outstanding tasks, in the order it
makes them; a new task goes to the worker with the fewest. Workers send their results
straight to the consumer on the shared results pipe; the coordinator never touches batch data.

It waits on the consumer's control pipe, the consumer's exit (a pidfd, checked to be the
consumer's by its start time: a pid alone may be reused) and every worker's sentinel at
once, so a death is seen at once, and never blocks on a write (``Outbox``es). When a worker
dies it posts ``WorkerLost``; the consumer answers ``Lost`` with the batches that never
arrived, and those are redone by a fresh worker -- the one it was making at most
``retries`` times. A late batch (``TimedOut``) is answered at once, as its worker is killed,
not when the death is seen. At shutdown only a worker still making a batch is killed; idle
workers are told to stop. Workers are forked from the coordinator, a fresh single-threaded
process, whatever start method started it. See ``docs/design.md`` ("Processes and the data
path", "Who writes to whom", "Failures", "Shutdown").
"""

from __future__ import annotations

import os
import selectors
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import multiprocess
import numpy as np

from ..core.config import LoaderConfig
from ..core.schedule import GiveUp, Schedule, Why
from ..errors import WorkersKeepDyingError, describe_exit
from ..ipc.channel import Outbox, PipeReader, atomic_body, encode, send
from ..ipc.ending import close_process, join_or_kill, pidfd_of, same_process_alive
from ..ipc.lifetime import PARENT_CHECK_INTERVAL_S, batch_scheduling, ignore_sigint, import_before_forking
from ..ipc.segments import SegmentRef, unlink_prefix
from . import messages
from .spawn import resolve_sources

# Workers that die with nothing to do (a broken environment, not a poison batch)
# are replaced this many times, then the coordinator gives up.
IDLE_DEATHS_ALLOWED = 8
# How long a worker told to stop may take before it is killed.
WORKER_JOIN_TIMEOUT_S = 1.0


# What a selector key's data says the ready descriptor is (a worker's key holds its _Worker).
_CONTROL = "control"  # the consumer's messages
_CONSUMER_EXIT = "consumer exit"  # a pidfd of the consumer: readable once it has exited


class _ConsumerGone(Exception):
    """The consumer's end of the results pipe is closed: nobody is left to serve."""


@dataclass
class _Worker:
    process: Any
    tasks_conn: Any
    outbox: Outbox  # tasks on their way into tasks_conn
    tasks: deque[messages.Task] = field(default_factory=deque)  # outstanding, in the order it makes them
    killed_for: int | None = None  # the late batch it was killed for (answered already)


class Coordinator:
    """The coordinator's state and event loop (one per coordinator process)."""

    def __init__(
        self,
        control: Any,
        results: Any,
        config: LoaderConfig,
        prefix: str,
        start: int,
        consumer: tuple[int, int | None],
        worker_main: Callable[..., None],
    ):
        self.worker_main = worker_main  # a worker process's entry point (``worker.worker_main``)
        self.control = control
        self.results = results
        self.config = config
        self.prefix = prefix
        self.order = config.order
        self.schedule = Schedule(self.order, start, config.prefetch, config.max_slots, config.retries)
        self.segments: dict[int, SegmentRef] = {}
        self.size_hint = 0
        self.idle_deaths = 0
        self.workers: list[_Worker] = []
        self.active = config.workers  # the first ``active`` workers get tasks (workers="auto" parks the rest)
        self.late_kills: dict[int, int] = {}  # pid of a worker killed for a late batch -> that batch
        self.hedged: set[int] = set()  # batches made twice (``hedge``), at or beyond the position
        self.last_hedge: set[int] = set()  # pids of the workers making the last hedged batch (killed at shutdown)
        method = "fork" if "fork" in multiprocess.get_all_start_methods() else config.start_method
        self.ctx = multiprocess.get_context(method)
        self.consumer = consumer  # (pid, start ticks): the pid alone may be reused once it is gone
        self.consumer_gone = False
        self.stop_request = messages.Stop(start)  # what the consumer has, as its ``Stop`` says
        self.selector = selectors.DefaultSelector()
        self.control_pipe = PipeReader(control)
        self.selector.register(self.control_pipe.fileno(), selectors.EVENT_READ, _CONTROL)
        self.consumer_exit: int | None = None
        try:
            self.consumer_exit = pidfd_of(*consumer)
            if self.consumer_exit is None:
                self.consumer_gone = True  # ``run`` ends at once
            else:
                self.selector.register(self.consumer_exit, selectors.EVENT_READ, _CONSUMER_EXIT)
        except (AttributeError, OSError):  # pragma: no cover - old kernel: a poll every 0.25 s
            pass
        self.outbox = Outbox(results, private=True, selector=self.selector)  # this process's messages to the consumer

    # --- workers ------------------------------------------------------------------------

    def _start_worker(self) -> None:
        tasks_out, tasks_in = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(
            target=self.worker_main,
            args=(tasks_out, self.results, self.config, self.prefix, os.getpid()),
            daemon=True,
            name="prefetch-worker",
        )
        process.start()
        tasks_out.close()
        worker = _Worker(process, tasks_in, Outbox(tasks_in, selector=self.selector))
        self.workers.append(worker)
        self.selector.register(process.sentinel, selectors.EVENT_READ, worker)

    def _lose_worker(self, worker: _Worker) -> None:
        """A worker died (or was killed): post its outstanding tasks, start a replacement."""
        worker.process.join(WORKER_JOIN_TIMEOUT_S)
        self.selector.unregister(worker.process.sentinel)
        self.workers.remove(worker)
        worker.outbox.close()
        worker.tasks_conn.close()
        pid, exitcode = worker.process.pid, worker.process.exitcode
        close_process(worker.process)  # its sentinel pipe: a long run replaces many workers
        outstanding = self._outstanding(worker)
        if worker.killed_for is not None:  # killed for a late batch, answered already (_on_lost)
            self.late_kills[pid] = worker.killed_for
        elif not outstanding:
            self.idle_deaths += 1
            if self.idle_deaths > IDLE_DEATHS_ALLOWED:
                raise WorkersKeepDyingError(
                    f"workers keep dying before doing any work (last: pid {pid} {describe_exit(exitcode)})",
                    pid=pid,
                    exitcode=exitcode,
                )
        self._start_worker()
        self._post(messages.WorkerLost(pid, exitcode, outstanding, self._worker_pids()))

    def _worker_pids(self) -> tuple[int, ...]:
        """The workers' pids, for the consumer's ``stats()`` (which then never looks for them in /proc)."""
        return tuple(worker.process.pid for worker in self.workers)

    def _outstanding(self, worker: _Worker) -> tuple[tuple[int, int], ...]:
        return tuple((t.batch, t.slot) for t in worker.tasks if t.batch >= self.schedule.position)

    def _on_lost(self, message: messages.Lost) -> None:
        """The consumer says which of a lost worker's batches never came: they are redone, or failed."""
        late = self.late_kills.pop(message.pid, None)
        if late is not None:  # killed for ``late``: the others are redone, none counted against
            self.schedule.requeue(message.tasks, late)
            return
        give_up = self.schedule.lost(message.tasks)  # never LATE here: late batches are answered at once
        if give_up is not None:
            who, how = f"worker pid {message.pid}", describe_exit(message.exitcode)
            self._post(give_up._replace(pid=message.pid, who=who, how=how))

    def _on_timed_out(self, batch: int) -> None:
        """Kill the worker making the late ``batch`` and answer at once: the batch is given up now, not
        when the death is seen (a worker stuck in an uninterruptible read, or tearing down a large
        memory, may take long to die). Its slot comes back with the death (``_on_lost``): until then
        the dying worker may still write to it. If no worker has the batch, it is given up now too."""
        for worker in self.workers:
            if worker.killed_for is None and any(task.batch == batch for task in worker.tasks):
                worker.killed_for = batch
                worker.process.kill()  # the sentinel reports it later: _lose_worker, then _on_lost
                pid = worker.process.pid
                self._post(GiveUp(batch, Why.LATE, pid=pid, who=f"worker pid {pid}"))
                return
        self.schedule.cancel(batch)
        self._post(GiveUp(batch, Why.LATE))

    # --- dispatch -----------------------------------------------------------------------

    def _dispatch(self) -> None:
        working = self.workers[: self.active]  # a replacement takes its place at the end
        while working:
            next_task = self.schedule.next_task()
            if next_task is None:
                return
            batch, slot = next_task
            self._send(min(working, key=lambda w: len(w.tasks)), batch, slot)

    def _send(self, worker: _Worker, batch: int, slot: int) -> None:
        indices = self.order.batch_indices(batch).astype(np.int64, copy=False).tobytes()
        task = messages.Task(batch, indices, slot, self.segments.get(slot), self.size_hint)
        worker.tasks.append(task)
        try:
            worker.outbox.put(encode(task))
        except OSError:  # it just died: its sentinel reports it, and the task is redone with its others
            pass

    def _on_hedge(self, batch: int) -> None:
        """The loop waits too long for ``batch``: a second worker makes it too, the one with the fewest tasks
        of the working ones that do not have it, in a spare place (``core/hedging.py``). Nothing if there is none."""
        others = [
            w for w in self.workers[: self.active] if w.killed_for is None and all(t.batch != batch for t in w.tasks)
        ]
        if batch < self.schedule.position or batch in self.hedged or not others:
            return
        slot = self.schedule.spare_place()
        if slot is None:
            return
        worker = min(others, key=lambda w: len(w.tasks))
        self.hedged.add(batch)
        self.last_hedge = {w.process.pid for w in self.workers if w is worker or w not in others}
        self._send(worker, batch, slot)
        self._post(messages.Hedged(batch, worker.process.pid))

    # --- writing without blocking -------------------------------------------------------

    def _post(self, message: Any) -> None:
        """Send ``message`` to the consumer on the results pipe, now or once it has room."""
        try:
            self.outbox.put(atomic_body(message, self.prefix))
        except BrokenPipeError:
            raise _ConsumerGone() from None

    def _flush(self, outbox: Outbox) -> None:
        try:
            outbox.flush()
        except BrokenPipeError:
            if outbox is self.outbox:
                raise _ConsumerGone() from None
            # a worker's pipe: the worker is dead, and its sentinel reports it

    # --- the consumer's messages --------------------------------------------------------

    def _on_consumed(self, message: messages.Consumed) -> None:
        position = message.position
        if self.schedule.consumed(position, (slot for slot, _ in message.released), message.held):
            for worker in self.workers:
                if worker.tasks and worker.tasks[0].batch < position:
                    worker.tasks = deque(t for t in worker.tasks if t.batch >= position)
            self.hedged = {batch for batch in self.hedged if batch >= position}
        for slot, segment in message.released:
            if segment is not None:
                self.segments[slot] = segment
                self.size_hint = max(self.size_hint, segment.size)

    def _from_consumer(self) -> bool:
        """Read all the consumer's messages; False when it asks to stop or is gone."""
        try:
            arrived = self.control_pipe.read_available()
        except (EOFError, OSError):
            return False
        for message in arrived:
            if isinstance(message, messages.Consumed):
                self._on_consumed(message)
            elif isinstance(message, messages.Lost):
                self._on_lost(message)
            elif isinstance(message, messages.TimedOut):
                self._on_timed_out(message.batch)
            elif isinstance(message, messages.Hedge):
                self._on_hedge(message.batch)
            elif isinstance(message, messages.Resize):  # workers="auto": within the budget and the slots
                self.active = max(1, min(message.workers, self.config.workers))
                shallowest = min(self.config.credit_step + 1, self.config.prefetch)  # credits come back in steps
                self.schedule.prefetch = max(shallowest, min(message.window, self.config.prefetch))
            else:
                assert isinstance(message, messages.Stop)
                self.stop_request = message
                return False
        return True

    def run(self) -> None:
        """The event loop: dispatch, wait for the consumer, a worker's death or room in a pipe, react;
        until the consumer says stop or is gone."""
        try:
            self._serve()
        except _ConsumerGone:
            self.consumer_gone = True

    def _serve(self) -> None:
        if self.consumer_gone:
            return
        for _ in range(self.config.workers):
            self._start_worker()
        self._post(messages.CoordinatorReady(os.getpid(), self._worker_pids()))
        polling = self.consumer_exit is None  # no pidfd: the consumer is polled instead
        next_parent_check = time.monotonic() + PARENT_CHECK_INTERVAL_S
        while True:
            self._dispatch()
            wait_s = max(0.0, next_parent_check - time.monotonic()) if polling else None
            for key, _ in self.selector.select(wait_s):
                if key.data is _CONTROL:
                    if not self._from_consumer():
                        return
                elif key.data is _CONSUMER_EXIT:
                    raise _ConsumerGone()
                elif isinstance(key.data, Outbox):
                    self._flush(key.data)
                elif key.data in self.workers:
                    self._lose_worker(key.data)
            if polling and time.monotonic() >= next_parent_check:
                if not same_process_alive(*self.consumer):
                    raise _ConsumerGone()
                next_parent_check = time.monotonic() + PARENT_CHECK_INTERVAL_S

    def last_word(self, message: Any) -> None:
        """Post ``message`` on the way out, waiting a moment for room (the consumer may read it)."""
        try:
            self._post(message)
            self.outbox.flush_within(WORKER_JOIN_TIMEOUT_S)
        except (_ConsumerGone, OSError):
            pass

    def shutdown(self) -> None:
        """Stop every worker and tell the consumer how each ended (``WorkersStopped``).

        Only a worker still making a batch is killed at once (nobody will take it; it may be stuck in
        user code): one with a task that reached its pipe and is neither below the consumer's position
        nor among the results it received, as its ``Stop`` says. Idle workers drop their queued tasks
        and are told to ``Stop``; killed if not gone within ``WORKER_JOIN_TIMEOUT_S``. When the
        consumer is gone, every worker is killed."""
        position = max(self.stop_request.position, self.schedule.position)
        received = set(self.stop_request.received)
        for worker in self.workers:
            unsent = worker.outbox.drop_queued()
            sent = list(worker.tasks)[: len(worker.tasks) - unsent]
            busy = any(task.batch >= position and task.batch not in received for task in sent)
            busy = busy or worker.process.pid in self.last_hedge  # its copy may still be in the making
            if self.consumer_gone or busy or worker.killed_for is not None:
                worker.process.kill()
                continue
            try:
                worker.outbox.put(encode(messages.Stop()))
            except OSError:  # it died meanwhile
                pass
        join_or_kill([worker.process for worker in self.workers], WORKER_JOIN_TIMEOUT_S)
        exits = tuple((worker.process.pid, worker.process.exitcode) for worker in self.workers)
        for worker in self.workers:
            close_process(worker.process)
        if not self.consumer_gone:
            self.last_word(messages.WorkersStopped(exits))


def coordinator_main(
    control: Any,
    results: Any,
    config: LoaderConfig | bytes,
    prefix: str,
    start: int,
    consumer: tuple[int, int | None],
    worker_main: Callable[..., None],
) -> None:
    """The coordinator process's entry point (``config`` as is when forked, from ``spawn.pickle_config`` when spawned;
    ``consumer`` is the consumer's pid and start time, ``lifetime.start_ticks``).

    ``worker_main`` is what each forked worker runs; the launcher passes it, so that the coordinator and
    the worker, two roles side by side, never import each other."""
    ignore_sigint()
    batch_scheduling()
    coordinator = None
    try:
        if isinstance(config, bytes):
            import dill

            config = dill.loads(config)
        assert isinstance(config, LoaderConfig)
        import_before_forking(config.limit_threads)
        config = replace(config, sources=resolve_sources(config.sources))
        coordinator = Coordinator(control, results, config, prefix, start, consumer, worker_main)
        coordinator.run()
    except BaseException:
        failure = messages.CoordinatorCrashed(traceback.format_exc())
        if coordinator is not None:
            coordinator.last_word(failure)
        else:
            try:
                send(results, failure, prefix)
            except OSError:
                pass
    finally:
        if coordinator is not None:
            coordinator.shutdown()
        unlink_prefix(prefix)
