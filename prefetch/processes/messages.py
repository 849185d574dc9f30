"""The messages that cross process boundaries, and nothing else.

Every message is a small typed ``NamedTuple`` (immutable, and the cheapest typed
record to pickle: the hot path sends a few per batch). Array data never travels in
a message: it is in a shared-memory slot (``slots``). The pipes, and who writes what::

    control  consumer -> coordinator      Consumed, Lost, TimedOut, Stop
    tasks    coordinator -> one worker    Task, Stop
    results  workers -> consumer          BatchReady, BatchFailed
             coordinator -> consumer      CoordinatorReady, WorkerLost, BatchAbandoned, CoordinatorFailed,
                                          WorkersStopped

``background()`` runs one producer process on two pipes of its own, with the same framing::

    items    producer -> consumer         ItemReady, Exhausted, ItemFailed
    credits  consumer -> producer         SlotFree, Stop

Any of these may also arrive as ``Spilled`` (a message too large for one atomic write).

The results pipe has many writers and one reader. Each message goes in one
``write`` of at most ``PIPE_BUF`` bytes, which POSIX makes atomic (``channel``), so
messages never interleave and a dying worker leaves no half message. The pipe is
FIFO: a ``WorkerLost`` notice, written after the coordinator saw the death, arrives
after everything the dead worker managed to send, so the consumer knows exactly
which of its batches never came.
"""

from __future__ import annotations

import pickle
from typing import NamedTuple

from ..core.pipeline import Timings
from ..core.schedule import GiveUp
from ..errors import Failure


class SegmentRef(NamedTuple):
    """A shared-memory segment: its file name in the shm directory and its size in bytes."""

    name: str
    size: int


class Task(NamedTuple):
    """Coordinator -> worker: make batch ``batch`` from ``indices`` into slot ``slot``."""

    batch: int
    indices: bytes  # int64 sample indices (bytes pickle faster than an array)
    slot: int
    segment: SegmentRef | None  # the slot's segment as last reported; None until one exists
    size_hint: int  # bytes of the largest slot so far: the size to create a new one with


class SlotArrays(NamedTuple):
    """A batch that is nothing but arrays stacked in its slot -- one array, a tuple or a dict
    of them, the usual case -- described without pickle, which costs more than the rest of
    a small batch's trip. ``arrays`` gives each array's ``(offset, dtype.str, shape)``;
    ``tensors`` lists ``(position, torch dtype name)`` for the leaves that are ``torch.Tensor``s
    viewing their array (``tensors.from_array``)."""

    container: str  # "array", "tuple" or "dict"
    keys: tuple[str, ...]  # the dict's keys, in order; () otherwise
    arrays: tuple[tuple[int, str, tuple[int, ...]], ...]
    tensors: tuple[tuple[int, str], ...] = ()


class SlotLayout(NamedTuple):
    """Where a batch sits in its slot: the one record of a batch's layout, from the writer (a worker,
    ``background``'s producer) to the reader.

    Either ``arrays`` describes it (``SlotArrays``), or ``payload`` is the batch pickled with
    protocol 5, its array buffers out of band, and ``buffers`` gives each buffer's
    ``(offset, nbytes)`` in ``segment``. A large payload is itself stored in the segment: then
    ``payload`` is None and the last entry of ``buffers`` locates it. ``segment`` is None when
    nothing was written to the slot (no arrays, small payload).
    """

    segment: SegmentRef | None
    payload: bytes | None
    buffers: tuple[tuple[int, int], ...]
    arrays: SlotArrays | None = None


class BatchReady(NamedTuple):
    """Worker -> consumer: batch ``batch`` is in slot ``slot``, laid out as ``layout`` says."""

    batch: int
    slot: int
    layout: SlotLayout
    timings: Timings
    pid: int


class BatchFailed(NamedTuple):
    """Worker -> consumer: user code raised while batch ``batch`` was made (``failure`` holds it);
    slot ``slot`` has nothing in it."""

    batch: int
    slot: int
    indices: tuple[int, ...]
    pid: int
    failure: Failure


class BatchAbandoned(NamedTuple):
    """Coordinator -> consumer: batch ``batch`` will not be made (``why``); ``message`` is the text of
    the consumer's error. Its slot is the coordinator's again already -- a late batch's once the death
    of the worker killed for it is seen (until then that worker may still write to it)."""

    batch: int
    indices: tuple[int, ...]
    pid: int | None
    why: GiveUp
    message: str


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


class CoordinatorFailed(NamedTuple):
    """Coordinator -> consumer: the coordinator itself failed; ``traceback`` says where."""

    traceback: str


class Spilled(NamedTuple):
    """Any writer -> consumer: a message too large for one atomic write, stored in a file."""

    segment: SegmentRef


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


class ItemReady(NamedTuple):
    """``background`` producer -> consumer: the iterable's next item is in ``slot``, laid out as ``layout`` says."""

    slot: int
    layout: SlotLayout


class Exhausted(NamedTuple):
    """``background`` producer -> consumer: the iterable has no more items."""


class ItemFailed(NamedTuple):
    """``background`` producer -> consumer: the iterable raised; ``failure`` packs the exception."""

    failure: Failure


class SlotFree(NamedTuple):
    """Consumer -> ``background`` producer: ``slot`` was read (copied out) and may be written again."""

    slot: int


class Stop(NamedTuple):
    """Consumer -> coordinator, coordinator -> worker, consumer -> ``background`` producer: shut down now.

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
    | BatchFailed
    | BatchAbandoned
    | WorkerLost
    | CoordinatorReady
    | CoordinatorFailed
    | Spilled
    | Consumed
    | Lost
    | TimedOut
    | ItemReady
    | Exhausted
    | ItemFailed
    | SlotFree
    | Stop
    | WorkersStopped
)


def encode(message: Message) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> Message:
    message: Message = pickle.loads(data)
    return message
