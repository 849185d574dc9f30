"""A worker process: take a ``Task``, make the batch into its slot, answer; until ``Stop``.

It keeps the executor contract: ``ipc.lifetime.worker_prologue`` once, then each batch by
``core.pipeline.make_numbered_batch`` into its slot (``ipc.slots``); this module is the loop around
it: take a ``Task`` from the coordinator, answer ``BatchReady`` or ``BatchFailure`` on the shared
results pipe, until ``Stop``, a closed pipe or the death of the coordinator.

A worker reads its task pipe only between batches; the coordinator never waits for
it to (its writes are queued in an ``Outbox``). The worker's own answers are plain
atomic writes to the results pipe: one waits only while the consumer has not read
``prefetch`` answers yet -- the backpressure -- and never past the engine's end,
since the coordinator kills its workers when the consumer dies, and a worker dies
with the coordinator (``PR_SET_PDEATHSIG``). See ``docs/design.md`` ("Who writes to whom").
"""

from __future__ import annotations

import os
import select
import time
from collections import deque
from typing import Any

import numpy as np

from ..core.config import LoaderConfig
from ..core.pipeline import UserCodeRaised, make_numbered_batch
from ..core.readahead import cancel_ahead, reading, rule_for
from ..errors import Failure
from ..ipc.channel import PipeReader, send
from ..ipc.lifetime import PARENT_CHECK_INTERVAL_S, die_with_parent, worker_prologue
from ..ipc.slots import SlotWriter
from .messages import BatchFailure, BatchReady, Stop, Task

# How often an idle worker checks that its coordinator is still alive.
PARENT_CHECK_INTERVAL_MS = round(PARENT_CHECK_INTERVAL_S * 1000)
# What a slot holds, and the fix when /dev/shm cannot hold one (the error a full /dev/shm gives).
SLOT_PURPOSE = ("a batch", "free space there, lower `prefetch` or the batch size (Docker: --shm-size)")


def run_task(config: LoaderConfig, writer: SlotWriter, task: Task, after: Any = None) -> BatchReady | BatchFailure:
    """Make one batch into its slot and say how it went; ``after``: the message this worker takes next
    (a ``Task``: its loads may start now, ``make_numbered_batch``'s ``ahead``)."""
    space = writer.space(task.slot, task.segment, task.size_hint)
    indices = np.frombuffer(task.indices, np.int64)
    ahead = (after.batch, np.frombuffer(after.indices, np.int64)) if isinstance(after, Task) else None
    hedged_before = rule_for(config).hedges if config.hedge else 0
    try:
        batch, timings = make_numbered_batch(config, task.batch, indices, space.alloc, ahead=ahead)
    except UserCodeRaised as error:
        return BatchFailure(task.batch, task.slot, tuple(indices.tolist()), os.getpid(), error.failure)
    start = time.perf_counter()
    try:
        written = writer.write(task.slot, space, batch)
    except Exception as exc:  # e.g. /dev/shm full, or an object that cannot be pickled
        failure = Failure.capture(exc, f"writing the batch of samples {indices.tolist()} to shared memory")
        return BatchFailure(task.batch, task.slot, tuple(indices.tolist()), os.getpid(), failure)
    timings = timings._replace(transfer=time.perf_counter() - start)
    hedged = rule_for(config).hedges - hedged_before if config.hedge else 0
    return BatchReady(task.batch, task.slot, written, timings, os.getpid(), hedged)


def worker_main(tasks: Any, results: Any, config: LoaderConfig, prefix: str, parent_pid: int) -> None:
    """A worker process's life: tasks in, results out, until told to stop or orphaned."""
    die_with_parent()  # started by the coordinator's only thread (see lifetime.die_with_parent)
    worker_prologue(config.worker_nice, config.limit_threads)
    writer = SlotWriter(prefix, SLOT_PURPOSE)
    inbox = PipeReader(tasks)
    poller = select.poll()
    poller.register(inbox.fileno(), select.POLLIN)
    try:
        _serve(inbox, poller, results, config, writer, prefix, parent_pid)
    finally:
        cancel_ahead()  # the next batch's loads not started yet never start (core/readahead.py)
    if reading():  # a dropped copy of a hedged read still reading (it may never end): do not join its
        os._exit(0)  # thread at exit, which the coordinator would end by a kill after a timeout


def _serve(
    inbox: PipeReader, poller: Any, results: Any, config: LoaderConfig, writer: SlotWriter, prefix: str, parent_pid: int
) -> None:
    """Take the tasks that arrived when none is queued -- with ``io_threads > 1``, also when one is, so that
    its successor's loads can start with it (``make_numbered_batch``'s ``ahead``) -- and make them in order."""
    queued: deque[Any] = deque()
    reads_ahead = config.io_threads > 1
    while os.getppid() == parent_pid:
        if not queued or (reads_ahead and len(queued) == 1):
            if poller.poll(PARENT_CHECK_INTERVAL_MS if not queued else 0):
                try:
                    arrived = inbox.read_available()
                except (EOFError, OSError):
                    return
                if any(isinstance(message, Stop) for message in arrived):
                    return  # shutting down: the tasks that came with it are wanted no more
                queued.extend(arrived)
            if not queued:
                continue
        message = queued.popleft()
        if isinstance(message, Stop):
            return
        assert isinstance(message, Task)
        try:
            send(results, run_task(config, writer, message, queued[0] if queued else None), prefix)
        except OSError:  # the consumer is gone
            return
