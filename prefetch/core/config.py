"""One frozen, validated configuration: what every process of a loader is handed.

The options of ``Loader`` are listed once: the fields of ``LoaderConfig``, each with its default
(``DEFAULTS`` is derived from them; ``LoaderOptions`` repeats the names for type checkers, and a
test holds the two together). ``validation.make_config`` checks them at construction, in the
fields' order, and builds the ``LoaderConfig``, which holds the stream's ``Order`` and works out
the memory bound (``max_slots``, ``shm_bytes_needed``) in one place.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol, TypedDict

import numpy as np

from .order import DEFAULT_BLOCK_SIZE, Order

COLLATE_MODES = ("auto", "list")
# Of ``LoaderConfig.saved_state`` (``Loader.state_dict()``): 2 since the order became a bijection (0.3);
# format 1 was saved with 0.2's permutations (see ``resumed``).
STATE_FORMAT = 2
EXECUTORS = ("processes", "ray")
# Default ready-or-in-flight batches per worker: one being made, one waiting, so a
# worker never idles between batches.
PREFETCH_PER_WORKER = 2
# ... and one more for small pools: a credit travels consumer -> coordinator -> worker, one hop
# more than in a loader without a coordinator, and with tiny batches two per worker let a pool of
# 1-3 workers run dry during that trip. Always a multiple of the workers: batches come back in
# order, so a worker holding one more than the others makes them all wait (measured: 8 workers
# with 2 ms samples reach 97 % of ideal at prefetch=16 and 71 % at 18).
SMALL_POOL_WORKERS = 4
SMALL_POOL_PREFETCH_PER_WORKER = 3
# How far workers step back from the training step (nice increment; 19 is the most, 0 is none), when they do:
# always with an int worker_nice, with "auto" once the loop is measured compute-bound (_stepback).
# Measured on 2 cores (bench/e2e.py, Keras fit and the JPEG pipeline): 0 makes a compute-bound step slower than
# the plain generator; 10 beat 19 on both (19 starves the workers while the step's threads spin).
DEFAULT_WORKER_NICE = 10


class GeneratorOptions(TypedDict, total=False):
    """The options ``data_generator`` takes by keyword: all of ``Loader``'s but its positional
    ``batch_size`` and ``shuffle``. For type checkers only: the list itself is ``LoaderConfig``'s
    fields (a test holds the two together). What each means: ``docs/api.md``."""

    world_size: int
    rank: int
    seed: int | None
    block_size: int | None
    epochs: int | None
    last_batch: str
    load: Callable[[Any], Any] | None
    transform: Callable[[Any], Any] | None
    batch_transform: Callable[[Any], Any] | None
    collate: str | Callable[[list[Any]], Any]
    io_threads: int
    workers: int | str | None
    prefetch: int | None
    local_ranks: int | None
    start_method: str | None
    timeout: float | None
    retries: int
    hedge: bool
    limit_threads: bool
    worker_nice: int | str
    train_threads: str | int | None
    executor: Any
    cache_bytes: int | None
    cache: str | os.PathLike[str] | None


class LoaderOptions(GeneratorOptions, total=False):
    """Every option of ``Loader``, by name (``Loader(*sources, **options)``), for type checkers."""

    batch_size: int
    shuffle: bool | str


class SampleStore(Protocol):
    """Where ``load``'s results are kept (``cache=``): what ``pipeline`` asks per sample, by index. The
    implementations touch files and shared memory, so they live outside the core (``prefetch.cache``)."""

    def get(self, index: int) -> tuple[bool, Any]:
        """``(True, sample)`` if sample ``index`` is kept, else ``(False, None)``."""

    def put(self, index: int, sample: Any) -> bool:
        """Keep ``sample`` if there is room; True if it was kept."""


def option(default: Any) -> Any:
    """A field of ``LoaderConfig`` that is an option of ``Loader``: ``default`` is what the user gets by
    leaving it out, before validation (``seed=None`` becomes a drawn seed, ``workers=None`` the cores)."""
    return field(metadata={"default": default})


class ShmNeed(NamedTuple):
    """Bytes of ``/dev/shm`` the slots of a loader take, for batches of a given size."""

    window: int  # ``prefetch`` batches: what any loop needs
    most: int  # ``max_slots`` batches: a loop that keeps batches alive may need that many


@dataclass(frozen=True)
class LoaderConfig:
    """Everything that defines a loader's stream and how it is made; ``validation.make_config`` builds it.

    Its fields after ``sources`` are the options of ``Loader``, listed once, each with its default
    (``DEFAULTS``), in the order they are checked: a check sees the options before it. Derived from
    the fields, each in one place: ``order`` (the batch plan, made once and held), ``runs_user_code``
    and the memory bound (``credit_step``, ``max_slots``, ``shm_bytes_needed``).
    """

    sources: tuple[Any, ...]
    batch_size: int = option(32)
    shuffle: bool | str = option(True)  # True, False or "block"
    block_size: int | None = option(None)  # samples per block with shuffle="block" (then DEFAULT_BLOCK_SIZE)
    world_size: int = option(1)
    rank: int = option(0)
    seed: int = option(None)  # None: drawn at construction
    epochs: int | None = option(None)  # None: endless
    last_batch: str = option("wrap")
    load: Callable[[Any], Any] | None = option(None)  # the deterministic part of a sample (decode), before transform
    transform: Callable[[Any], Any] | None = option(None)
    batch_transform: Callable[[Any], Any] | None = option(None)
    collate: str | Callable[[list[Any]], Any] = option("auto")
    io_threads: int = option(1)  # threads loading a batch's samples (source[i]) at once, in each worker
    local_ranks: int = option(None)  # ranks sharing this node's CPUs, /dev/shm and memory; None: LOCAL_WORLD_SIZE
    workers: int = option("auto")  # "auto": the CPUs this rank may use, forked, given tasks on figures; None: all work
    prefetch: int = option(None)  # None: per worker, see PREFETCH_PER_WORKER, within the byte budget
    start_method: str | None = option(None)  # None: the platform's default
    timeout: float | None = option(None)
    retries: int = option(1)
    hedge: bool = option(False)  # make the batch the loop waits for a second time when it is late (core/hedging)
    limit_threads: bool = option(True)
    worker_nice: int | str = option(DEFAULT_WORKER_NICE)  # how far workers step back from the step; "auto": _stepback
    train_threads: str | int | None = option("auto")  # the training framework's intra-op threads (see _tuning)
    executor: Any = option("processes")  # what runs the batches: "processes", "ray", or an executor object
    cache_bytes: int | None = option(None)  # the most bytes the cache keeps; None: as many as there is room for
    cache: str | None = option(None)  # where load's results are kept: None, "memory" or a directory (absolute)
    provenance: tuple[str, ...] = ()  # where workers and prefetch came from, in words (``validation``)
    store: SampleStore | None = None  # the cache's store (``prefetch.cache.open_cache``); None without cache=
    # workers="auto": ``workers`` are forked, and how many get tasks is decided on figures (``core.autoscale``)
    auto_workers: bool = False

    @cached_property
    def order(self) -> Order:
        """The batch plan (``order.batch_indices(b)``, ``num_batches``, ``steps_per_epoch``): made once,
        when first asked for, and kept. ``dataclasses.replace`` gives a configuration that makes its own.
        It is left out of the pickled state (its caches are of no use elsewhere) and made again on arrival:
        on its way to a spawned coordinator the sources are placeholders, resolved there first."""
        return Order(
            n=self.n,
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle=self.shuffle,
            block_size=self.block_size or DEFAULT_BLOCK_SIZE,
            epochs=self.epochs,
            last_batch=self.last_batch,
            rank=self.rank,
            world_size=self.world_size,
        )

    @cached_property
    def runs_user_code(self) -> bool:
        """Whether user code runs while a batch is made (a transform, a collate function, or a source class
        whose ``__getitem__`` may draw random numbers): then the global random generators are seeded per
        batch (``pipeline.make_numbered_batch``). Plain lists, tuples, ranges and arrays need no seeding."""
        plain = all(isinstance(s, (np.ndarray, list, tuple, range)) for s in self.sources)
        return (
            not plain
            or self.load is not None
            or self.transform is not None
            or self.batch_transform is not None
            or callable(self.collate)
        )

    def batch_bytes(self) -> int | None:
        """Bytes of one batch, from the numpy sources' sample sizes; None when no source is an array.
        Sources that are not arrays are left out, so this is a lower bound of the raw batch (a ``transform``
        may change the size, see ``exact_batch_size``)."""
        total, known = 0, False
        for source in self.sources:
            if isinstance(source, np.ndarray) and not source.dtype.hasobject and source.ndim >= 1:
                total += source.itemsize * int(np.prod(source.shape[1:], dtype=np.int64)) * self.batch_size
                known = True
        return total if known else None

    @property
    def exact_batch_size(self) -> bool:
        """Whether ``batch_bytes`` is the batch as delivered: no user code can change its size."""
        return (
            self.load is None and self.transform is None and self.batch_transform is None and not callable(self.collate)
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("order", None)  # made again on arrival (see ``order``)
        state.pop("runs_user_code", None)  # a spawned coordinator's sources are placeholders until resolved
        return state

    # --- the memory bound: every figure derived from ``prefetch`` is here ------------------------

    @property
    def credit_step(self) -> int:
        """Credits the consumer returns per ``Consumed`` message: an eighth of the window's
        slack beyond one batch per worker. The coordinator wakes less often than once per
        batch when the window is deep, while credits held back never leave a worker idle."""
        return max(1, (self.prefetch - self.workers) // 8)

    @property
    def max_slots(self) -> int:
        """The most slots a pool ever has: the window, ``prefetch`` batches held by the user
        (past that the consumer copies batches out instead), and the releases not yet
        reported."""
        return 2 * self.prefetch + self.credit_step + 1

    def shm_bytes_needed(self, batch_bytes: int) -> ShmNeed:
        """``/dev/shm`` the slots take with batches of ``batch_bytes``: ``prefetch`` of them for
        any loop, ``max_slots`` for one that keeps batches alive."""
        return ShmNeed(window=self.prefetch * batch_bytes, most=self.max_slots * batch_bytes)

    @property
    def n(self) -> int:
        return len(self.sources[0])

    def saved_state(self, position: int) -> dict[str, Any]:
        """``Loader.state_dict()``: the position, the seed, and the fields the position depends on."""
        return {"format": STATE_FORMAT, "seed": self.seed, "position": position, "config": self.fingerprint()}

    def resumed(self, state: Any) -> tuple[int, int]:
        """``(seed, position)`` of a ``saved_state`` that this configuration can continue (``ValueError``
        naming what differs otherwise): the same fields, a position within the stream. 0.2's states (format 1)
        are taken with ``shuffle=False`` only, whose order did not change; a shuffled one would repeat some
        samples of its epoch and skip others."""
        if not isinstance(state, dict) or state.get("format") not in (1, STATE_FORMAT):
            raise ValueError(f"not a prefetch Loader state (format {STATE_FORMAT}): {state!r}")
        if state["format"] == 1 and state.get("config", {}).get("shuffle") is not False:
            raise ValueError(
                "this state was saved by prefetch 0.2 (state format 1), whose shuffled order differs from this "
                "version's: resuming it here would repeat some samples of its epoch and skip others. Resume it with "
                "prefetch 0.2, or start this version at the beginning of that epoch: "
                "state['format'] = 2; state['position'] -= state['position'] % len(loader)"
            )
        mine = self.fingerprint()
        for key, value in state["config"].items():
            if mine.get(key) != value:
                raise ValueError(
                    f"the state was saved by a loader with {key}={value!r}, this one has {key}={mine.get(key)!r}; "
                    "resume with the same configuration"
                )
        position, total = state["position"], self.order.num_batches
        if isinstance(position, numbers.Integral) and not isinstance(position, bool):
            position = int(position)  # e.g. an np.int64 from a saved array
        if not isinstance(position, int) or position < 0 or (total is not None and position > total):
            raise ValueError(f"state position {position!r} is outside this loader's {total} batches")
        return int(state["seed"]), position

    def fingerprint(self) -> dict[str, Any]:
        """The fields a saved position is only valid for (``load_state_dict`` compares them)."""
        return {
            "n": self.n,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "block_size": self.block_size,
            "epochs": self.epochs,
            "last_batch": self.last_batch,
            "rank": self.rank,
            "world_size": self.world_size,
        }


# Each option's default, as the user may leave it out, in the order they are checked: from the fields.
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {f.name: f.metadata["default"] for f in fields(LoaderConfig) if "default" in f.metadata}
)
