"""The seam between the consumer and wherever batches are made: the ``Executor`` interface.

The consumer's engine (``consumer.Engine``) owns what the user sees: the reorder buffer,
the ``timeout`` clock, closing from any thread, statistics. An executor owns where batches
are made and how they travel back: ``processes`` (a coordinator process, forked workers,
shared-memory slots) or ``ray`` (Ray actors, the object store). Both use the same
process-free core (``core.order``, ``core.pipeline``, ``core.schedule``), so a batch is the
same whichever executor made it.

The conversation, from the engine's side::

    executor.start(config, start, wake)   make batches start, start + 1, ... ahead of the consumer
    executor.advance(position)            the consumer wants batch `position`: all before it are taken
    executor.wait(seconds)   -> [Made | Failed, ...]   results in completion order (maybe none)
    executor.late(batch)                  `timeout` passed for `batch`: stop whoever makes it
    executor.open(made)      -> batch     the user's batch, from a result the engine kept
    executor.drop(made)                   a result nobody will open (a duplicate of a redone batch)
    executor.stop()                       end everything
    executor.forget()                     in a forked child: let go of our copies, touch nothing

Rules every executor keeps (``docs/design.md`` says why):

* at most ``config.prefetch`` batches are ready or in flight beyond ``position``;
* batch ``b`` is made with ``core.pipeline.make_batch`` from ``config.order.batch_indices(b)``,
  the global generators seeded by ``core.rng`` for ``b`` first;
* a lost worker's batches are redone (the one it was making at most ``config.retries`` times),
  so the output does not change; past that, ``Failed`` with ``WorkerDiedError``;
* after ``late(b)`` a ``Failed(b, WorkerTimeoutError)`` follows; an executor that cannot
  deliver it raises an error from ``wait`` instead (never leaves the engine waiting);
* ``wait`` returns early, with what it has, once ``wake`` is woken (``close()`` from another thread);
* ``stop`` leaves no process, actor or shared-memory segment of the loader behind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from .core.pipeline import Timings

if TYPE_CHECKING:
    from .core.config import LoaderConfig
    from .ipc.channel import WakePipe


class Made(NamedTuple):
    """Batch ``batch`` is made; ``where`` is the executor's own note of where it is (a slot, an object)."""

    batch: int
    timings: Timings
    worker: int  # the pid of the process that made it (per-worker figures in ``Stats``)
    where: Any


class Failed(NamedTuple):
    """Batch ``batch`` cannot be made; ``error`` is raised to the user when they reach it."""

    batch: int
    error: BaseException


Result = Made | Failed


class WorkerInfo(NamedTuple):
    """One worker as ``Stats`` shows it: its pid, its node (executors that have nodes: Ray's node id),
    and whether it runs on this machine (only then can its pid be looked up here, for CPU and memory)."""

    pid: int
    node: str | None = None
    here: bool = True


class Executor(Protocol):
    """Where batches are made. See the module docstring for the conversation and its rules."""

    @property
    def started(self) -> bool:
        """Whether the workers are up: ``timeout`` clocks run only from then on."""
        ...

    @property
    def restarts(self) -> int:
        """Workers lost and replaced so far."""
        ...

    def start(self, config: LoaderConfig, start: int, wake: WakePipe) -> None: ...

    def advance(self, position: int) -> None: ...

    def wait(self, seconds: float) -> list[Result]: ...

    def late(self, batch: int) -> None: ...

    def open(self, made: Made) -> Any: ...

    def drop(self, made: Made) -> None: ...

    def workers(self) -> list[WorkerInfo]: ...

    def helper_pid(self) -> int | None:
        """A process of the executor's that is not a worker (the coordinator), for ``Stats.memory``."""
        ...

    def forget(self) -> None:
        """In a child forked from the owner (user code called ``os.fork()``): let go of this
        process's copies of what the executor holds, and touch nothing the parent still uses."""
        ...

    def stop(self) -> None: ...
