"""The ``processes`` executor's protocol: the messages between its three roles, and nothing else.

Every message is a small typed ``NamedTuple`` (immutable, and the cheapest typed
record to pickle: the hot path sends a few per batch). Array data never travels in
a message: it is in a shared-memory slot (``ipc.slots``). The pipes, and who writes what::

    control  consumer -> coordinator      Consumed, Lost, TimedOut, Resize, Stop
    tasks    coordinator -> one worker    Task, Stop
    results  workers -> consumer          BatchReady, BatchFailure
             coordinator -> consumer      CoordinatorReady, WorkerLost, GiveUp (core.schedule),
                                          CoordinatorCrashed, WorkersStopped

Any of these may also arrive as ``ipc.channel.Spilled`` (a message too large for one atomic write).

The results pipe has many writers and one reader. Each message goes in one
``write`` of at most ``PIPE_BUF`` bytes, which POSIX makes atomic (``channel``), so
messages never interleave and a dying worker leaves no half message. The pipe is
FIFO: a ``WorkerLost`` notice, written after the coordinator saw the death, arrives
after everything the dead worker managed to send, so the consumer knows exactly
which of its batches never came.
"""

from __future__ import annotations

from typing import NamedTuple

from ..core.pipeline import Timings
from ..core.schedule import GiveUp
from ..errors import Failure
from ..ipc.segments import SegmentRef
from ..ipc.slots import SlotLayout


class Task(NamedTuple):
    """Coordinator -> worker: make batch ``batch`` from ``indices`` into slot ``slot``."""

    batch: int
    indices: bytes  # int64 sample indices (bytes pickle faster than an array)
    slot: int
    segment: SegmentRef | None  # the slot's segment as last reported; None until one exists
    size_hint: int  # bytes of the largest slot so far: the size to create a new one with


class BatchReady(NamedTuple):
    """Worker -> consumer: batch ``batch`` is in slot ``slot``, laid out as ``layout`` says."""

    batch: int
    slot: int
    layout: SlotLayout
    timings: Timings
    pid: int
    hedged_reads: int = 0  # reads of it started a second time (``hedge=True``, ``core/readahead``)


class BatchFailure(NamedTuple):
    """Worker -> consumer: user code raised while batch ``batch`` was made (``failure`` holds it);
    slot ``slot`` has nothing in it."""

    batch: int
    slot: int
    indices: tuple[int, ...]
    pid: int
    failure: Failure


class WorkerLost(NamedTuple):
    """Coordinator -> consumer: worker ``pid`` died with ``tasks`` (batch, slot) outstanding;
    ``workers`` are the worker pids now, its replacement included.

    The consumer answers ``Lost`` with those it never received.
    """

    pid: int
    exitcode: int | None
    tasks: tuple[tuple[int, int], ...]
    workers: tuple[int, ...] = ()


class CoordinatorReady(NamedTuple):
    """Coordinator -> consumer: its workers, pids ``workers``, are started (``timeout`` clocks start from here)."""

    pid: int
    workers: tuple[int, ...] = ()


class CoordinatorCrashed(NamedTuple):
    """Coordinator -> consumer: the coordinator itself raised (not user code: prefetch's own error, or
    ``WorkersKeepDyingError``); ``traceback`` says where. The loader cannot go on."""

    traceback: str


class Consumed(NamedTuple):
    """Consumer -> coordinator: ``position`` batches are yielded; ``released`` slots are free.

    Each yielded batch returns one credit, so at most ``prefetch`` batches are ready
    or in flight. A slot comes back only when the user has dropped every array viewing
    it, with the segment it now has (None when unchanged since last told); ``held`` is
    how many batches the user holds.
    """

    position: int
    released: tuple[tuple[int, SegmentRef | None], ...]
    held: int


class Lost(NamedTuple):
    """Consumer -> coordinator: of a lost worker's tasks, these (in its order) never arrived."""

    pid: int
    exitcode: int | None
    tasks: tuple[tuple[int, int], ...]


class TimedOut(NamedTuple):
    """Consumer -> coordinator: waited more than ``timeout`` for ``batch``: kill its worker."""

    batch: int


class Hedge(NamedTuple):
    """Consumer -> coordinator: the loop has waited too long for ``batch`` (``core.hedging``): have an other
    worker make it too."""

    batch: int


class Hedged(NamedTuple):
    """Coordinator -> consumer: worker ``pid`` makes ``batch`` a second time (a hedge)."""

    batch: int
    pid: int


class Resize(NamedTuple):
    """Consumer -> coordinator (``workers="auto"``): give tasks to the first ``workers`` workers only, and keep
    ``window`` batches ready or in flight (at most the configuration's ``prefetch``). A parked worker finishes
    what it has and then gets nothing; the batches are the same."""

    workers: int
    window: int


class Stop(NamedTuple):
    """Consumer -> coordinator, coordinator -> worker: shut down now.

    From the consumer to the coordinator it says what the consumer has: every batch below ``position``,
    and ``received`` beyond it (results that arrived, taken or not). A worker whose batch is not among
    them is still making it and is killed; the others are idle and stop on their own (design.md,
    "Shutdown")."""

    position: int = 0
    received: tuple[int, ...] = ()


class WorkersStopped(NamedTuple):
    """Coordinator -> consumer, its last message: how each worker ended, ``(pid, exit code)``; 0 for a
    worker that stopped when told, -9 for one killed (SIGKILL), None for one that had not ended yet."""

    exits: tuple[tuple[int, int | None], ...]


Message = (
    Task
    | BatchReady
    | BatchFailure
    | GiveUp
    | WorkerLost
    | CoordinatorReady
    | CoordinatorCrashed
    | Consumed
    | Lost
    | TimedOut
    | Hedge
    | Hedged
    | Resize
    | Stop
    | WorkersStopped
)
