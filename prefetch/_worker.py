"""The worker process: load samples, transform, collate, write the batch into its slot, report.

``make_batch`` is the whole per-batch pipeline. It is shared with the in-process
engine (``workers=0``), so both produce the same batches, and it can be tested
without any process. ``worker_main`` is the loop around it in a worker process:
take a ``Task`` from the coordinator, answer ``BatchReady`` or ``BatchFailed``,
until ``Stop``, a closed pipe or the death of the coordinator.

Every exception user code raises while a batch is made -- any ``BaseException`` subclass,
``KeyboardInterrupt`` included (a worker ignores SIGINT, so there it can only come from user
code) -- is packed into ``BatchFailed`` and raised in the consumer as itself, exactly as with
``workers=0``; it is never mistaken for a worker crash, so user code never runs twice because of
it. ``SystemExit`` is the one exception: ``sys.exit()`` in user code ends the worker process, like
``os._exit()``, and is handled as a worker death (the batch is redone up to ``retries`` times, then
``WorkerDiedError`` names the exit code).

A worker reads its task pipe only between batches; the coordinator never waits for
it to (its writes are queued in an ``Outbox``). The worker's own answers are plain
atomic writes to the results pipe: one waits only while the consumer has not read
``prefetch`` answers yet -- the backpressure -- and never past the engine's end,
since the coordinator kills its workers when the consumer dies, and a worker dies
with the coordinator (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _rng
from ._channel import PipeReader, send
from ._protocol import BatchFailed, BatchReady, FailureKind, Stop, Task, Timings
from ._shm import SlotWriter
from .collate import Alloc, SourceMemory, StreamingStack, collate_auto, collate_list, private_alloc
from .config import LoaderConfig
from .errors import Failure

# How often an idle worker checks that its coordinator is still alive.
PARENT_CHECK_INTERVAL_MS = 250
_PR_SET_PDEATHSIG = 1
_PR_SET_TIMERSLACK = 29
# Linux lets a timed wait (time.sleep, a poll with a timeout) overshoot by the thread's
# timer slack, 50 us by default: 2.5 % of a 2 ms wait. Workers that wait on storage or a
# network with timeouts should wake on time; the cost is a few more timer interrupts.
WORKER_TIMER_SLACK_NS = 1000


class BatchError(Exception):
    """User code failed while making a batch; ``failure`` is the packed exception."""

    def __init__(self, failure: Failure, original: BaseException):
        super().__init__(failure.text)
        self.failure = failure
        self.original = original


@dataclass
class _Clock:
    load: float = 0.0
    transform: float = 0.0
    collate: float = 0.0


def _fast_path(config: LoaderConfig, sources: tuple[Any, ...]) -> bool:
    """Whole-batch ``np.take`` is the same as per-sample loading and stacking for plain arrays."""
    return (
        config.transform is None
        and config.collate == "auto"
        and all(isinstance(s, np.ndarray) and not s.dtype.hasobject for s in sources)
    )


def _take(sources: tuple[Any, ...], indices: np.ndarray, alloc: Alloc) -> Any:
    parts = []
    for source in sources:
        out = alloc((len(indices), *source.shape[1:]), source.dtype)
        parts.append(np.take(source, indices, axis=0, out=out, mode="clip"))
    return parts[0] if len(parts) == 1 else tuple(parts)


def _collate_fn(config: LoaderConfig) -> Callable[[list[Any], Alloc], Any]:
    if config.collate == "auto":
        return collate_auto
    if config.collate == "list":
        return collate_list
    user_collate = config.collate
    assert callable(user_collate)
    return lambda samples, alloc: user_collate(samples)


def _transform_all(
    config: LoaderConfig, samples: list[Any], indices: np.ndarray, alloc: Alloc
) -> StreamingStack | None:
    """Transform ``samples`` in place; with ``collate="auto"``, stack each into the batch as it
    comes (``StreamingStack``) and return the stack, or None if the samples were kept instead."""
    transform = config.transform
    assert transform is not None
    stack: StreamingStack | None = None
    position = 0
    try:
        for position, sample in enumerate(samples):
            sample = transform(sample)
            if position == 0 and config.collate == "auto" and StreamingStack.accepts(sample):
                stack = StreamingStack(sample, len(samples), alloc)
            if stack is not None:
                if stack.push(sample):
                    samples[position] = None  # its memory is reused, still in cache, by the next sample
                    continue
                samples[:position] = stack.rows_as_samples()  # does not match: collate the usual way
                stack = None
            samples[position] = sample
    except SystemExit:  # sys.exit() in user code ends the worker: see the module docstring
        raise
    except BaseException as exc:  # any user exception, KeyboardInterrupt too
        where = f"transform of sample {int(indices[position])}"
        raise BatchError(Failure.capture(exc, where), exc) from exc
    return stack


def make_batch(
    config: LoaderConfig, indices: np.ndarray, alloc: Alloc = private_alloc, private: SourceMemory | None = None
) -> tuple[Any, _Clock]:
    """Batch ``indices``: load each sample, transform it, collate, then ``batch_transform``.

    The caller seeds the random generators first. User-code exceptions come out as
    ``BatchError`` naming the stage and the sample index. With ``private`` (the calling
    process, ``workers=0``) the parts of the batch that alias a source are copied, as a
    worker's slot would (see ``SourceMemory``); the whole-batch ``np.take`` never aliases.
    """
    clock = _Clock()
    sources = config.sources
    safety = None
    if private is not None:
        safety = private.for_batch()
        alloc = safety.alloc
    start = time.perf_counter()
    if _fast_path(config, sources):
        batch = _take(sources, indices, alloc)
        clock.load = time.perf_counter() - start
    else:
        samples = []
        index = -1
        try:
            if len(sources) == 1:
                source = sources[0]
                for index in indices.tolist():
                    samples.append(source[index])
            elif len(sources) == 2:  # (x, y): the common case, without a generator per sample
                first, second = sources
                for index in indices.tolist():
                    samples.append((first[index], second[index]))
            else:
                for index in indices.tolist():
                    samples.append(tuple(source[index] for source in sources))
        except SystemExit:  # sys.exit() in user code ends the worker: see the module docstring
            raise
        except BaseException as exc:  # any user exception, KeyboardInterrupt too
            raise BatchError(Failure.capture(exc, f"loading sample {index}"), exc) from exc
        if safety is not None:
            safety.add(samples)  # before a transform replaces them
        clock.load = time.perf_counter() - start
        start = time.perf_counter()
        stacked = None
        if config.transform is not None:
            stacked = _transform_all(config, samples, indices, alloc)
            clock.transform = time.perf_counter() - start
            start = time.perf_counter()
        if stacked is not None:
            batch = stacked.result()
        else:
            try:
                batch = _collate_fn(config)(samples, alloc)
            except SystemExit:  # sys.exit() in user code ends the worker: see the module docstring
                raise
            except BaseException as exc:  # any user exception, KeyboardInterrupt too
                raise BatchError(Failure.capture(exc, f"collate of samples {indices.tolist()}"), exc) from exc
        clock.collate = time.perf_counter() - start
    if config.batch_transform is not None:
        start = time.perf_counter()
        try:
            batch = config.batch_transform(batch)
        except SystemExit:  # sys.exit() in user code ends the worker: see the module docstring
            raise
        except BaseException as exc:  # any user exception, KeyboardInterrupt too
            raise BatchError(Failure.capture(exc, f"batch_transform of samples {indices.tolist()}"), exc) from exc
        clock.transform += time.perf_counter() - start
    if safety is not None:
        batch = safety.detach(batch)
    return batch, clock


def _uses_randomness(config: LoaderConfig) -> bool:
    """Whether user code runs while a batch is made (a transform, a collate function, or a
    source class whose ``__getitem__`` may draw random numbers): then the global random
    generators are seeded per batch. Plain lists, tuples and arrays need no seeding."""
    plain = all(isinstance(s, (np.ndarray, list, tuple, range)) for s in config.sources)
    return not plain or config.transform is not None or config.batch_transform is not None or callable(config.collate)


def run_task(config: LoaderConfig, writer: SlotWriter, task: Task) -> BatchReady | BatchFailed:
    """Make one batch into its slot and say how it went."""
    if _uses_randomness(config):
        _rng.seed_globals(config.seed, task.batch)
    space = writer.space(task.slot, task.segment, task.size_hint)
    indices = np.frombuffer(task.indices, np.int64)
    try:
        batch, clock = make_batch(config, indices, space.alloc)
    except BatchError as error:
        return BatchFailed(
            task.batch, task.slot, tuple(indices.tolist()), os.getpid(), FailureKind.USER_CODE, error.failure
        )
    start = time.perf_counter()
    try:
        written = writer.write(task.slot, space, batch)
    except Exception as exc:  # e.g. /dev/shm full, or an object that cannot be pickled
        failure = Failure.capture(exc, f"writing the batch of samples {indices.tolist()} to shared memory")
        return BatchFailed(task.batch, task.slot, tuple(indices.tolist()), os.getpid(), FailureKind.USER_CODE, failure)
    timings = Timings(clock.load, clock.transform, clock.collate, time.perf_counter() - start)
    return BatchReady(
        task.batch, task.slot, written.segment, written.payload, written.buffers, written.arrays, timings, os.getpid()
    )


def batch_scheduling(enabled: bool = True) -> None:
    """Run this process under Linux's SCHED_BATCH policy (or back under the normal one):
    the coordinator then does not preempt the training loop each time a message wakes it,
    which on a machine with few cores costs the consumer more than the message itself.
    Workers go back to the normal policy: a worker waking from I/O should run at once."""
    try:
        policy = os.SCHED_BATCH if enabled else os.SCHED_OTHER
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        pass


# The environment variables the common BLAS and OpenMP runtimes read when they start.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def limit_threads() -> None:
    """One BLAS/OpenMP thread per worker, so N workers do not oversubscribe the cores: for the
    runtimes already loaded (threadpoolctl) and for those a transform loads later (environment)."""
    for name in THREAD_ENV_VARS:
        os.environ[name] = "1"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency; only the environment then
        return
    threadpool_limits(1)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the coordinator) dies, and to
    keep timed waits short (``WORKER_TIMER_SLACK_NS``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(_PR_SET_TIMERSLACK, WORKER_TIMER_SLACK_NS)
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the poll below still works
        pass


def worker_main(tasks: Any, results: Any, config: LoaderConfig, prefix: str, parent_pid: int) -> None:
    """A worker process's life: tasks in, results out, until told to stop or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the consumer's to handle
    _die_with_parent()
    batch_scheduling(enabled=False)  # the coordinator's policy is inherited: undo it
    if config.worker_nice:
        os.nice(config.worker_nice)  # the training step goes first (see _tuning)
    if config.limit_threads:
        limit_threads()
    writer = SlotWriter(prefix)
    inbox = PipeReader(tasks)
    poller = select.poll()
    poller.register(inbox.fileno(), select.POLLIN)
    queued: deque[Any] = deque()
    while os.getppid() == parent_pid:
        if not queued:
            if not poller.poll(PARENT_CHECK_INTERVAL_MS):
                continue
            try:
                arrived = inbox.read_available()
            except (EOFError, OSError):
                return
            if any(isinstance(message, Stop) for message in arrived):
                return  # shutting down: the tasks that came with it are wanted no more
            queued.extend(arrived)
            continue
        message = queued.popleft()
        if isinstance(message, Stop):
            return
        assert isinstance(message, Task)
        try:
            send(results, run_task(config, writer, message), prefix)
        except OSError:  # the consumer is gone
            return
