"""One frozen, validated configuration: what every process of a loader is handed.

Validation happens here, at construction, so a bad argument fails in the user's
call with a message that names the option, the value received and what is
accepted -- never later inside a worker.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ._tuning import DEFAULT_WORKER_NICE
from .core.order import LAST_BATCH_MODES, Order
from .errors import PrefetchWarning

COLLATE_MODES = ("auto", "list")
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
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class LoaderConfig:
    """Everything that defines a loader's stream and how it is made."""

    sources: tuple[Any, ...]
    batch_size: int
    shuffle: bool
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

    @property
    def n(self) -> int:
        return len(self.sources[0])

    def order(self) -> Order:
        return Order(
            n=self.n,
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle=self.shuffle,
            epochs=self.epochs,
            last_batch=self.last_batch,
            rank=self.rank,
            world_size=self.world_size,
        )

    def fingerprint(self) -> dict[str, Any]:
        """The fields a saved position is only valid for (``load_state_dict`` compares them)."""
        return {
            "n": self.n,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "epochs": self.epochs,
            "last_batch": self.last_batch,
            "rank": self.rank,
            "world_size": self.world_size,
        }


def _start_methods() -> list[str]:
    import multiprocessing  # lazily: `import prefetch` stays fast

    return multiprocessing.get_all_start_methods()


def _is_int(value: Any) -> bool:
    """Any integer (``int``, ``np.int64``, ``np.uint8``, ...: every ``numbers.Integral``), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _need_int(name: str, value: Any, minimum: int, what: str) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int {what}; got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int {what}; got {value!r}")
    return int(value)


def _caller_outside_prefetch() -> int:
    """The ``stacklevel`` that makes a warning point at the user's line, not at prefetch's own."""
    package = os.path.dirname(__file__)
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.dirname(frame.f_code.co_filename) == package:
        frame, level = frame.f_back, level + 1
    return level


def _warn_batch_larger_than_shard(batch_size: int, shard: int, world_size: int, rank: int, **stream: Any) -> None:
    """Warn (once, at construction) that a batch cannot be made of distinct samples of one epoch."""
    last_batch, epochs = stream["last_batch"], stream["epochs"]
    what = "the data" if world_size == 1 else f"rank {rank}'s shard"
    if last_batch == "short":
        happens = f"with last_batch='short' every batch is a whole epoch of {shard} samples, not {batch_size}"
    elif epochs is not None and epochs * shard <= batch_size:
        happens = f"the whole stream (epochs={epochs}) is {epochs * shard} samples: one short batch of that many"
    else:
        happens = (
            "with last_batch='wrap' each batch is completed from the next epochs, so it holds some samples "
            "more than once"
        )
    warnings.warn(
        f"batch_size={batch_size} is larger than the {shard} samples of {what}: {happens}. "
        f"Use batch_size <= {shard} to get batches of distinct samples.",
        PrefetchWarning,
        stacklevel=_caller_outside_prefetch(),
    )


def _need_callable(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable or None; got {value!r} ({type(value).__name__})")
    return value


def _check_sources(sources: tuple[Any, ...]) -> None:
    if not sources:
        raise TypeError("Loader needs at least one source: a sequence such as a list, tuple or numpy array")
    for position, source in enumerate(sources):
        if isinstance(source, Iterator) or not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
            raise TypeError(
                f"source {position} must be a map-style sequence (with __len__ and integer __getitem__: "
                f"a list, tuple, numpy array or memmap); got {type(source).__name__}. An iterator or "
                "generator cannot be indexed or shuffled: collect its items first (list(it), np.stack(list(it))), "
                "or run the generator as it is, ahead of the loop, with prefetch.background(it)"
            )
    lengths = [len(source) for source in sources]
    if lengths[0] == 0:
        raise ValueError("the sources are empty (length 0): there is nothing to load; pass at least one sample")
    if len(set(lengths)) > 1:
        shown = ", ".join(f"source {i} has {n}" for i, n in enumerate(lengths))
        raise ValueError(f"all sources must have the same length (sample i is source[i] of each); got {shown}")


def make_config(
    sources: tuple[Any, ...],
    *,
    batch_size: Any,
    shuffle: Any = True,
    seed: Any = None,
    epochs: Any = None,
    last_batch: Any = "wrap",
    rank: Any = 0,
    world_size: Any = 1,
    transform: Any = None,
    batch_transform: Any = None,
    collate: Any = "auto",
    workers: Any = None,
    prefetch: Any = None,
    start_method: Any = None,
    timeout: Any = None,
    retries: Any = 1,
    limit_threads: Any = True,
    worker_nice: Any = DEFAULT_WORKER_NICE,
    train_threads: Any = "auto",
) -> LoaderConfig:
    """Validate the user's arguments and return the loader's configuration."""
    _check_sources(sources)
    n = len(sources[0])
    batch_size = _need_int("batch_size", batch_size, 1, ">= 1")
    if not isinstance(shuffle, bool):
        raise TypeError(f"shuffle must be True or False; got {shuffle!r} ({type(shuffle).__name__})")
    if seed is None:
        import secrets

        seed = secrets.randbits(63)
    seed = _need_int("seed", seed, 0, ">= 0 (or None to draw one)")
    if epochs is not None:
        epochs = _need_int("epochs", epochs, 1, ">= 1 (or None for an endless stream)")
    if last_batch not in LAST_BATCH_MODES:
        raise ValueError(f"last_batch must be one of {', '.join(map(repr, LAST_BATCH_MODES))}; got {last_batch!r}")
    world_size = _need_int("world_size", world_size, 1, ">= 1")
    if world_size > n:
        raise ValueError(
            f"world_size={world_size} is larger than the data ({n} samples): some ranks would get none; "
            f"world_size must be between 1 and {n}"
        )
    rank = _need_int("rank", rank, 0, f"in [0, world_size={world_size})")
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank}")
    if last_batch == "drop" and batch_size > n // world_size:
        raise ValueError(
            f"last_batch='drop' with batch_size={batch_size} larger than the {n // world_size} samples of "
            "this rank's shard would never yield a batch; use a smaller batch_size or last_batch='short'/'wrap'"
        )
    if batch_size > n // world_size:
        _warn_batch_larger_than_shard(
            batch_size, n // world_size, world_size, rank, last_batch=last_batch, epochs=epochs
        )
    transform = _need_callable("transform", transform)
    batch_transform = _need_callable("batch_transform", batch_transform)
    if not callable(collate) and collate not in COLLATE_MODES:
        raise ValueError(f"collate must be 'auto', 'list' or a callable; got {collate!r}")
    workers = usable_cores() if workers is None else _need_int("workers", workers, 0, ">= 0 (0 runs in-process)")
    if prefetch is None:
        per_worker = SMALL_POOL_PREFETCH_PER_WORKER if workers < SMALL_POOL_WORKERS else PREFETCH_PER_WORKER
        prefetch = per_worker * max(workers, 1)
    prefetch = _need_int("prefetch", prefetch, 1, ">= 1 (batches ready or in flight)")
    if start_method is not None and start_method not in _start_methods():
        accepted = ", ".join(map(repr, _start_methods()))
        raise ValueError(f"start_method must be None or one of {accepted} on this platform; got {start_method!r}")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
            raise TypeError(
                f"timeout must be a number of seconds > 0 or None; got {timeout!r} ({type(timeout).__name__})"
            )
        seconds = float(timeout)
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"timeout must be a finite number of seconds > 0 or None; got {timeout!r}")
        timeout = seconds
    retries = _need_int("retries", retries, 0, ">= 0 (times a batch is redone after its worker died)")
    if not isinstance(limit_threads, bool):
        raise TypeError(f"limit_threads must be True or False; got {limit_threads!r}")
    worker_nice = _need_int("worker_nice", worker_nice, 0, "in [0, 19] (0: workers as urgent as the training loop)")
    if worker_nice > 19:
        raise ValueError(f"worker_nice must be an int in [0, 19]; got {worker_nice}")
    if train_threads != "auto" and train_threads is not None:
        train_threads = _need_int("train_threads", train_threads, 1, ">= 1, 'auto' or None")
    return LoaderConfig(
        sources=tuple(sources),
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        epochs=epochs,
        last_batch=last_batch,
        rank=rank,
        world_size=world_size,
        transform=transform,
        batch_transform=batch_transform,
        collate=collate,
        workers=workers,
        prefetch=prefetch,
        start_method=start_method,
        timeout=timeout,
        retries=retries,
        limit_threads=limit_threads,
        worker_nice=worker_nice,
        train_threads=train_threads,
    )
