"""Checking the user's options at construction: ``make_config``.

Validation happens here, in the user's call, so a bad argument fails with a message that names
the option, the value received and what is accepted -- never later inside a worker.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import _budget
from ._budget import Ranks
from .core.config import (
    COLLATE_MODES,
    DEFAULTS,
    EXECUTORS,
    PREFETCH_PER_WORKER,
    SMALL_POOL_PREFETCH_PER_WORKER,
    SMALL_POOL_WORKERS,
    LoaderConfig,
    LoaderOptions,
)
from .core.order import DEFAULT_BLOCK_SIZE, LAST_BATCH_MODES
from .errors import PrefetchWarning

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack is 3.11+; annotations are strings, never evaluated


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
    what = "the data" if world_size == 1 else f"rank {rank}'s shard"
    if stream["last_batch"] == "short":
        happens = f"with last_batch='short' every batch is a whole epoch of {shard} samples, not {batch_size}"
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


def _need_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r} ({type(value).__name__})")
    return value


def _reject_unknown(options: Mapping[str, Any]) -> None:
    """``TypeError`` for an option ``Loader`` does not have, as Python words it for a keyword argument."""
    import difflib

    for name in options:
        if name not in DEFAULTS:
            close = difflib.get_close_matches(name, DEFAULTS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"Loader() got an unexpected keyword argument {name!r}{hint}")


# --- one check per option (in the order they are checked) ---------------------------------------


def _check_seed(seed: Any) -> int:
    if seed is None:
        import secrets

        seed = secrets.randbits(63)
    return _need_int("seed", seed, 0, ">= 0 (or None to draw one)")


def _check_shuffle(shuffle: Any) -> bool | str:
    if isinstance(shuffle, bool) or (isinstance(shuffle, str) and shuffle == "block"):
        return shuffle
    error = ValueError if isinstance(shuffle, str) else TypeError
    raise error(f"shuffle must be True, False or 'block'; got {shuffle!r} ({type(shuffle).__name__})")


def _check_block_size(block_size: Any, shuffle: bool | str) -> int | None:
    """Samples per block of ``shuffle="block"`` (its default when None); refused with any other shuffle,
    where it would do nothing."""
    if shuffle != "block":
        if block_size is not None:
            raise ValueError(
                f"block_size={block_size!r} applies to shuffle='block' only, and shuffle={shuffle!r}: pass "
                "shuffle='block' to read blocks of consecutive samples, or leave block_size out"
            )
        return None
    if block_size is None:
        return DEFAULT_BLOCK_SIZE
    return _need_int("block_size", block_size, 1, ">= 1 (consecutive samples per block of shuffle='block')")


def _check_epochs(epochs: Any) -> int | None:
    if epochs is None:
        return None
    return _need_int("epochs", epochs, 1, ">= 1 (or None for an endless stream)")


def _check_last_batch(last_batch: Any) -> str:
    if last_batch not in LAST_BATCH_MODES:
        raise ValueError(f"last_batch must be one of {', '.join(map(repr, LAST_BATCH_MODES))}; got {last_batch!r}")
    return str(last_batch)


def _check_world_size(world_size: Any, n: int) -> int:
    world_size = _need_int("world_size", world_size, 1, ">= 1")
    if world_size > n:
        raise ValueError(
            f"world_size={world_size} is larger than the data ({n} samples): some ranks would get none; "
            f"world_size must be between 1 and {n}"
        )
    return world_size


def _check_rank(rank: Any, world_size: int) -> int:
    rank = _need_int("rank", rank, 0, f"in [0, world_size={world_size})")
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank}")
    return rank


def _check_shared_seed(seed: Any, world_size: int, rank: int) -> None:
    """Sharding splits one permutation among the ranks: they must agree on its seed (never draw their own)."""
    if world_size > 1 and seed is None:
        raise ValueError(
            f"seed=None with world_size={world_size} (this is rank {rank}): each rank would draw a seed of its "
            "own and shuffle differently, so the ranks' shards would overlap and miss samples. Pass the same "
            "seed on every rank, e.g. seed=1234 on every rank, or your training script's own seed"
        )


def _check_batch_fits_shard(stream: dict[str, Any], n: int) -> None:
    """A batch larger than the rank's shard: an error when no batch would come, else a warning."""
    batch_size, world_size, last_batch = stream["batch_size"], stream["world_size"], stream["last_batch"]
    shard = n // world_size
    if batch_size <= shard:
        return
    if last_batch == "drop":
        raise ValueError(
            f"last_batch='drop' with batch_size={batch_size} larger than the {shard} samples of "
            "this rank's shard would never yield a batch; use a smaller batch_size or last_batch='short'/'wrap'"
        )
    _warn_batch_larger_than_shard(batch_size, shard, world_size, stream["rank"], last_batch=last_batch)


def _check_collate(collate: Any) -> str | Callable[[list[Any]], Any]:
    if not callable(collate) and collate not in COLLATE_MODES:
        raise ValueError(f"collate must be 'auto', 'list' or a callable; got {collate!r}")
    return collate


def _check_local_ranks(local_ranks: Any) -> Ranks:
    if local_ranks is not None:
        local_ranks = _need_int("local_ranks", local_ranks, 1, ">= 1 (ranks on this node) or None (LOCAL_WORLD_SIZE)")
    ranks = _budget.local_ranks(local_ranks)
    if ranks.ignored is not None:
        warnings.warn(
            f"{_budget.LOCAL_RANKS_VAR}={ranks.ignored!r} is not an int >= 1, so it is ignored: the loader sizes its "
            "workers and memory as if this were the only rank on the node. Pass local_ranks=<ranks on this node>, "
            f"or fix {_budget.LOCAL_RANKS_VAR} in the launcher's environment",
            PrefetchWarning,
            stacklevel=_caller_outside_prefetch(),
        )
    return ranks


def _check_workers(workers: Any, ranks: Ranks) -> tuple[int, str]:
    """The worker count, and where it came from."""
    if workers is None:
        budget = _budget.cpu_budget(ranks)
        return budget.cpus, f"workers={budget.cpus}: {budget.describe()}"
    workers = _need_int("workers", workers, 0, ">= 0 (0 runs in-process)")
    return workers, f"workers={workers}: as given"


def _check_prefetch(prefetch: Any, workers: int) -> tuple[int, str]:
    """The depth (the per-worker default before its byte ceiling, ``_budget.size_prefetch``), and where it came from."""
    if prefetch is None:
        per_worker = SMALL_POOL_PREFETCH_PER_WORKER if workers < SMALL_POOL_WORKERS else PREFETCH_PER_WORKER
        return per_worker * max(workers, 1), f"{per_worker} per worker"
    prefetch = _need_int("prefetch", prefetch, 1, ">= 1 (batches ready or in flight)")
    return prefetch, f"prefetch={prefetch}: as given"


def _check_start_method(start_method: Any) -> str | None:
    if start_method is not None and start_method not in _start_methods():
        accepted = ", ".join(map(repr, _start_methods()))
        raise ValueError(f"start_method must be None or one of {accepted} on this platform; got {start_method!r}")
    return start_method


def _check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds > 0 or None; got {timeout!r} ({type(timeout).__name__})")
    seconds = float(timeout)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"timeout must be a finite number of seconds > 0 or None; got {timeout!r}")
    return seconds


def _check_worker_nice(worker_nice: Any) -> int:
    worker_nice = _need_int("worker_nice", worker_nice, 0, "in [0, 19] (0: workers as urgent as the training loop)")
    if worker_nice > 19:
        raise ValueError(f"worker_nice must be an int in [0, 19]; got {worker_nice}")
    return worker_nice


def _check_train_threads(train_threads: Any) -> str | int | None:
    if train_threads == "auto" or train_threads is None:
        return train_threads
    return _need_int("train_threads", train_threads, 1, ">= 1, 'auto' or None")


def _check_executor(executor: Any) -> Any:
    """A name (``"processes"``, ``"ray"``) or an executor object, kept as given."""
    accepted = f"one of {', '.join(map(repr, EXECUTORS))} or an executor object"
    if isinstance(executor, str):
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be {accepted}; got {executor!r}")
    elif executor is None or isinstance(executor, (bool, numbers.Number)):
        raise TypeError(f"executor must be {accepted}; got {executor!r} ({type(executor).__name__})")
    return executor


# --- the groups, and make_config ------------------------------------------------------------------


def _check_stream(options: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The options that fix which samples make up each batch."""
    stream: dict[str, Any] = {"batch_size": _need_int("batch_size", options["batch_size"], 1, ">= 1")}
    stream["shuffle"] = _check_shuffle(options["shuffle"])
    stream["block_size"] = _check_block_size(options["block_size"], stream["shuffle"])
    stream["seed"] = _check_seed(options["seed"])
    stream["epochs"] = _check_epochs(options["epochs"])
    stream["last_batch"] = _check_last_batch(options["last_batch"])
    stream["world_size"] = _check_world_size(options["world_size"], n)
    stream["rank"] = _check_rank(options["rank"], stream["world_size"])
    _check_shared_seed(options["seed"], stream["world_size"], stream["rank"])
    _check_batch_fits_shard(stream, n)
    return stream


def _check_user_code(options: Mapping[str, Any]) -> dict[str, Any]:
    """The user's functions that make a batch out of samples."""
    return {
        "transform": _need_callable("transform", options["transform"]),
        "batch_transform": _need_callable("batch_transform", options["batch_transform"]),
        "collate": _check_collate(options["collate"]),
    }


def _check_running(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of how batches are made: processes, depth, time limits, CPU sharing."""
    ranks = _check_local_ranks(options["local_ranks"])
    running: dict[str, Any] = {"local_ranks": ranks.count}
    running["workers"], workers_from = _check_workers(options["workers"], ranks)
    running["prefetch"], prefetch_from = _check_prefetch(options["prefetch"], running["workers"])
    running["provenance"] = (workers_from, prefetch_from)  # a default depth's is completed by _size_prefetch
    running["start_method"] = _check_start_method(options["start_method"])
    running["timeout"] = _check_timeout(options["timeout"])
    running["retries"] = _need_int(
        "retries", options["retries"], 0, ">= 0 (times a batch is redone after its worker died)"
    )
    running["limit_threads"] = _need_bool("limit_threads", options["limit_threads"])
    running["worker_nice"] = _check_worker_nice(options["worker_nice"])
    running["train_threads"] = _check_train_threads(options["train_threads"])
    running["executor"] = _check_executor(options["executor"])
    return running


def make_config(sources: tuple[Any, ...], **options: Unpack[LoaderOptions]) -> LoaderConfig:
    """Validate the user's sources and options (any of ``LoaderOptions``; ``DEFAULTS`` for the
    rest) and return the loader's configuration. A bad value raises ``TypeError`` or ``ValueError``
    naming the option; an unknown option raises ``TypeError`` naming it."""
    _reject_unknown(options)
    _check_sources(sources)
    given = {**DEFAULTS, **options}
    n = len(sources[0])
    config = LoaderConfig(
        sources=tuple(sources), **_check_stream(given, n), **_check_user_code(given), **_check_running(given)
    )
    return config if given["prefetch"] is not None else _size_prefetch(config)


def _size_prefetch(config: LoaderConfig) -> LoaderConfig:
    """The default depth (per worker), within the byte budget (``_budget.size_prefetch``)."""
    workers_from, prefetch_from = config.provenance
    prefetch, prefetch_from = _budget.size_prefetch(config, prefetch_from, _budget.shm_dir())
    return replace(config, prefetch=prefetch, provenance=(workers_from, prefetch_from))
