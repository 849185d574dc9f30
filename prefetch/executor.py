"""The seam between the consumer and wherever batches are made: an ``Executor`` starts a ``Run``.

The consumer's engine (``consumer.Engine``) owns what the user sees: the reorder buffer, the
``timeout`` clock, closing from any thread, statistics. An executor owns where batches are made and
how they travel back: ``processes`` (a coordinator process, forked workers, shared-memory slots) or
``ray`` (Ray actors, the object store). An ``Executor`` is a template (what the user configured:
``executor="processes"``, ``RayExecutor(address=...)``); its ``start`` makes one ``Run``, one
start-to-stop, which the engine drives. The conversation, from the engine's side::

    run = executor.start(config, start, wake)   make batches start, start + 1, ... ahead of the consumer
    run.advance(position)              the consumer wants batch `position`: all before it are taken
    run.wait(seconds)   -> [Made | Unmade, ...]   results in completion order (maybe none)
    run.late(batch)                    `timeout` passed for `batch`: stop whoever makes it
    run.open(made)      -> batch       the user's batch, from a result the engine kept
    run.drop(made)                     a result nobody will open (a duplicate of a redone batch)
    run.stop()                         end everything
    run.forget()                       in a forked child: let go of our copies, touch nothing

The rules every run keeps are in ``docs/design.md`` ("Where a new executor goes"); the contract's
steps are code it calls: ``core.pipeline.make_numbered_batch``, ``ipc.lifetime.worker_prologue``,
``core.schedule.Schedule`` and ``GiveUp``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from .core.pipeline import Timings

if TYPE_CHECKING:
    from .core.config import LoaderConfig


class Wake(Protocol):
    """What a run watches to return early from ``wait``: readable once ``close()`` in another thread
    woke it, and ``woken`` then (the engine's ``ipc.channel.WakePipe``)."""

    @property
    def woken(self) -> bool: ...

    def fileno(self) -> int: ...


class Made(NamedTuple):
    """Batch ``batch`` is made; ``payload`` is the run's own typed record of where it is (the processes
    executor's ``BatchReady``: a slot and its layout; the Ray executor's ``Fetched``: a value)."""

    batch: int
    timings: Timings
    worker: int  # the pid of the process that made it (per-worker figures in ``Stats``)
    payload: Any


class Unmade(NamedTuple):
    """Batch ``batch`` will not be made: ``error`` is raised to the user when they reach it (a user
    exception rebuilt from its ``Failure``, or the error of a ``GiveUp``)."""

    batch: int
    error: BaseException


Result = Made | Unmade


class WorkerInfo(NamedTuple):
    """One worker as ``Stats`` shows it: its pid, its node (executors that have nodes: Ray's node id),
    and whether it runs on this machine (only then can its pid be looked up here, for CPU and memory)."""

    pid: int
    node: str | None = None
    here: bool = True


class Executor(Protocol):
    """Where batches are made: a template, started once per engine (see the module docstring)."""

    def start(self, config: LoaderConfig, start: int, wake: Wake) -> Run:
        """Start making batches ``start, start + 1, ...``; ``wake`` is woken by ``close()`` from another thread."""
        ...


class Run(Protocol):
    """One start-to-stop of an executor, driven by one engine. See the module docstring."""

    @property
    def started(self) -> bool:
        """Whether the workers are up: ``timeout`` clocks run only from then on."""
        ...

    @property
    def restarts(self) -> int:
        """Workers lost and replaced so far."""
        ...

    def advance(self, position: int) -> None: ...

    def wait(self, seconds: float) -> list[Result]: ...

    def late(self, batch: int) -> None: ...

    def open(self, made: Made) -> Any: ...

    def drop(self, made: Made) -> None: ...

    def workers(self) -> list[WorkerInfo]: ...

    def helper_pid(self) -> int | None:
        """A process of the run's that is not a worker (the coordinator), for ``Stats.memory``."""
        ...

    def forget(self) -> None:
        """In a child forked from the owner (user code called ``os.fork()``): let go of this
        process's copies of what the run holds, and touch nothing the parent still uses."""
        ...

    def stop(self) -> None: ...
