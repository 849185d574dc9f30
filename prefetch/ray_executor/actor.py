"""The Ray actor's side of ``executor="ray"``: how sources travel to an actor, and the actor itself.

Nothing here imports Ray at module level: ``ray_executor`` wraps ``BatchMaker`` with
``ray.remote`` when a loader starts, so ``import prefetch`` never pulls Ray in.

How each kind of source reaches an actor (``pack_sources`` in the consumer, ``unpack_sources``
in the actor):

* a plain ``numpy.ndarray`` is put in the object store once (``ray.put``) and handed to every
  actor by reference; on the consumer's node actors map it without a copy, other nodes fetch it
  once per node. Never once per task.
* a ``numpy.memmap`` that maps a whole region of its file is reopened by path (read-only) in
  each actor: the file must exist at the same path on every node that runs an actor.
* everything else -- ``prefetch.Files`` (paths and a ``load`` function), lists, user classes --
  travels inside the configuration, which is put in the object store once and unpickled once
  per actor. ``Files`` opens its paths in the actor, so they too must exist on its node.

Transforms, ``collate`` and ``batch_transform`` travel with the configuration, pickled by Ray's
cloudpickle: lambdas and closures work.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from ..core import rng
from ..core.config import LoaderConfig
from ..core.pipeline import BatchError, Timings, make_batch, uses_randomness
from ..errors import Failure
from ..ipc.lifetime import limit_threads, wake_on_time
from . import portable


@dataclass(frozen=True)
class InStore:
    """Source ``position`` is the ``position``-th array handed to the actor from the object store."""

    position: int


@dataclass(frozen=True)
class ByPath:
    """A ``numpy.memmap`` source, to be reopened read-only from its file on the actor's node."""

    filename: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    order: Literal["C", "F"]

    def open(self) -> np.memmap:
        dtype = np.dtype(self.dtype)
        return np.memmap(self.filename, dtype=dtype, mode="r", offset=self.offset, shape=self.shape, order=self.order)


@dataclass(frozen=True)
class Fail:
    """What an actor answers when user code raised while making a batch."""

    failure: Failure
    indices: tuple[int, ...]


def memmap_spec(source: np.memmap) -> ByPath | None:
    """How to reopen ``source`` from its file, or None when it is not a contiguous region of one
    (a strided view, a memmap without a file): then it is shipped as an array."""
    filename = getattr(source, "filename", None)
    mapping = getattr(source, "_mmap", None)
    if not filename or mapping is None:
        return None
    order: Literal["C", "F"]
    if source.flags.c_contiguous:
        order = "C"
    elif source.flags.f_contiguous:
        order = "F"
    else:
        return None
    # Where the array starts in the file: numpy maps from an allocation-granularity boundary.
    base = np.frombuffer(mapping, dtype=np.uint8)
    start = source.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    file_offset = source.offset - source.offset % _granularity() + start
    return ByPath(os.fspath(filename), source.dtype.str, tuple(source.shape), int(file_offset), order)


def _granularity() -> int:
    import mmap

    return mmap.ALLOCATIONGRANULARITY


def ship_config(config: LoaderConfig) -> LoaderConfig:
    """The configuration an actor receives: the executor option stripped (an executor instance
    holds actor handles and must not travel to its own actors)."""
    return replace(config, executor="ray")


def pack_sources(sources: tuple[Any, ...], put: Any) -> tuple[tuple[Any, ...], list[Any]]:
    """Split ``sources`` into what travels in the configuration and the object-store references
    handed to each actor (``put`` is ``ray.put``); see the module docstring."""
    packed: list[Any] = []
    refs: list[Any] = []
    for source in sources:
        spec = memmap_spec(source) if isinstance(source, np.memmap) else None
        if spec is not None:
            packed.append(spec)
        elif isinstance(source, np.ndarray):
            packed.append(InStore(len(refs)))
            refs.append(put(np.asarray(source)))  # a memmap that cannot be reopened travels as its data
        else:
            packed.append(source)
    return tuple(packed), refs


def unpack_sources(packed: tuple[Any, ...], arrays: tuple[Any, ...]) -> tuple[Any, ...]:
    """The actor's sources: arrays from the store, memmaps reopened, the rest as they came."""
    out: list[Any] = []
    for source in packed:
        if isinstance(source, InStore):
            out.append(arrays[source.position])
        elif isinstance(source, ByPath):
            out.append(source.open())
        else:
            out.append(source)
    return tuple(out)


class BatchMaker:
    """One Ray actor: makes batches by number with the same pipeline as a worker process.

    Ray runs an actor's calls one at a time in the order they were submitted, so the batches
    queued on an actor are made in order; the executor relies on it to tell which batch an
    actor was making when it died.
    """

    def __init__(self, config: LoaderConfig, *arrays: Any):
        if config.limit_threads:
            limit_threads()
        if config.worker_nice:
            os.nice(config.worker_nice)  # as a worker process: the training step goes first
        self.config = replace(config, sources=unpack_sources(config.sources, arrays))
        self.randomness = uses_randomness(self.config)
        self.pid = os.getpid()
        self.tight_thread: int | None = None  # the thread whose timer slack is set (see ``make``)

    def hello(self) -> tuple[int, str, str]:
        """``(pid, node id, node address)``: who this actor is, for ``Stats`` and failures."""
        import ray

        context = ray.get_runtime_context()
        return self.pid, context.get_node_id(), ray.util.get_node_ip_address()

    def make(self, batch: int, packed: bytes) -> tuple[Any, Timings] | Fail:
        """Batch ``batch`` of the samples ``packed`` (int64 indices): the collated batch and its timings,
        or ``Fail``."""
        indices = np.frombuffer(packed, dtype=np.int64)
        if self.tight_thread != threading.get_ident():
            # As a worker process does: a timed wait in a transform (a read with a timeout, a sleep)
            # wakes on time. Per thread, so set where the calls run (Ray's main thread here).
            self.tight_thread = threading.get_ident()
            wake_on_time()
        if self.randomness:
            rng.seed_globals(self.config.seed, batch)
        try:
            made, timings = make_batch(self.config, indices)
            return portable(made), timings
        except BatchError as error:
            return Fail(error.failure, tuple(indices.tolist()))
