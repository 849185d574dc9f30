"""One frozen, validated configuration: what every process of a loader is handed.

The options are listed once (``LoaderOptions``, with ``DEFAULTS``); ``validation.make_config``
checks them at construction and builds the ``LoaderConfig``, which holds the stream's ``Order``
and works out the memory bound (``max_slots``, ``shm_bytes_needed``) in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any, NamedTuple, TypedDict

from .._tuning import DEFAULT_WORKER_NICE
from .order import DEFAULT_BLOCK_SIZE, Order

COLLATE_MODES = ("auto", "list")
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


def usable_cores() -> int:
    """CPUs this process may use: its affinity mask, or its cgroup CPU quota if that allows fewer (``_budget``)."""
    from .._budget import process_cpus

    return process_cpus()


class GeneratorOptions(TypedDict, total=False):
    """The options ``data_generator`` takes by keyword: all of ``Loader``'s but its positional
    ``batch_size`` and ``shuffle``. What each means: ``docs/api.md``; defaults: ``DEFAULTS``."""

    seed: int | None
    block_size: int | None
    epochs: int | None
    last_batch: str
    rank: int
    world_size: int
    transform: Callable[[Any], Any] | None
    batch_transform: Callable[[Any], Any] | None
    collate: str | Callable[[list[Any]], Any]
    workers: int | None
    prefetch: int | None
    local_ranks: int | None
    start_method: str | None
    timeout: float | None
    retries: int
    limit_threads: bool
    worker_nice: int
    train_threads: str | int | None
    executor: Any


class LoaderOptions(GeneratorOptions, total=False):
    """Every option of ``Loader``, by name: the one list of them (``Loader(*sources, **options)``)."""

    batch_size: int
    shuffle: bool | str


# Each option's default, as the user may leave it out; ``make_config`` validates what it becomes.
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "batch_size": 32,
        "shuffle": True,
        "seed": None,  # drawn at construction
        "block_size": None,  # shuffle="block" only: then order.DEFAULT_BLOCK_SIZE
        "epochs": None,  # endless
        "last_batch": "wrap",
        "rank": 0,
        "world_size": 1,
        "transform": None,
        "batch_transform": None,
        "collate": "auto",
        "workers": None,  # the CPUs this rank may use (``_budget.cpu_budget``)
        "prefetch": None,  # per worker (PREFETCH_PER_WORKER), within the byte budget (``_budget.size_prefetch``)
        "local_ranks": None,  # LOCAL_WORLD_SIZE, else 1
        "start_method": None,  # the platform's default
        "timeout": None,
        "retries": 1,
        "limit_threads": True,
        "worker_nice": DEFAULT_WORKER_NICE,
        "train_threads": "auto",
        "executor": "processes",
    }
)


class ShmNeed(NamedTuple):
    """Bytes of ``/dev/shm`` the slots of a loader take, for batches of a given size."""

    window: int  # ``prefetch`` batches: what any loop needs
    most: int  # ``max_slots`` batches: a loop that keeps batches alive may need that many


@dataclass(frozen=True)
class LoaderConfig:
    """Everything that defines a loader's stream and how it is made; ``make_config`` builds it.

    Derived from the fields, each in one place: ``order`` (the batch plan, made once and held) and
    the memory bound (``credit_step``, ``max_slots``, ``shm_bytes_needed``).
    """

    sources: tuple[Any, ...]
    batch_size: int
    shuffle: bool | str
    seed: int
    epochs: int | None
    last_batch: str
    rank: int
    world_size: int
    transform: Callable[[Any], Any] | None
    batch_transform: Callable[[Any], Any] | None
    collate: str | Callable[[list[Any]], Any]
    workers: int
    prefetch: int
    start_method: str | None
    timeout: float | None
    retries: int
    limit_threads: bool = True
    worker_nice: int = DEFAULT_WORKER_NICE  # how far workers step back from the training step (os.nice)
    train_threads: str | int | None = "auto"  # the training framework's intra-op threads (see _tuning)
    executor: Any = "processes"  # what runs the batches: "processes", "ray", or an executor object
    block_size: int | None = None  # samples per block with shuffle="block"; None otherwise
    local_ranks: int = 1  # ranks sharing this node's CPUs, /dev/shm and memory (the defaults' budget)
    provenance: tuple[str, ...] = ()  # where workers and prefetch came from, in words (``_budget``)

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

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("order", None)
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
