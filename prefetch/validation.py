"""Checking the user's arguments at construction: ``make_config``.

Validation happens here, in the user's call, so a bad argument fails with a message that names
the option, the value received and what is accepted -- never later inside a worker. There is one
check per option (``CHECKS``: ``_check_<option>``, or one line for a plain int, bool or callable), and
``make_config`` runs them in the order of ``LoaderConfig``'s fields (the option list, written once in
``core/config.py``): each check sees the options checked before it (``rank`` sees ``world_size``,
``prefetch`` sees ``workers``). The defaults of ``workers`` and ``prefetch`` are sized to the machine
(``_budget``), and their checks say where each figure came from (``LoaderConfig.provenance``).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from . import _budget
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
from .errors import warn
from .sizing import size_prefetch

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack is 3.11+; annotations are strings, never evaluated

Check = Callable[[Any, dict[str, Any]], Any]
# option name -> its check: ``check(value, checked)`` returns the value the configuration holds;
# ``checked`` has ``sources`` and every option before this one, already checked, and what a check
# leaves for later ones: ``ranks`` (``_budget.Ranks``) and ``provenance`` (where a default came from).
CHECKS: dict[str, Check] = {}


def _checks_option(check: Check) -> Check:
    """Register ``check`` for the option its name ends with (``_check_workers`` checks ``workers``)."""
    CHECKS[check.__name__.removeprefix("_check_")] = check
    return check


def _int_option(name: str, minimum: int, what: str) -> None:
    """Register the check of an option that is an int ``>= minimum`` (``what`` says what is accepted)."""
    CHECKS[name] = lambda value, checked: _need_int(name, value, minimum, what)


def _bool_option(name: str) -> None:
    CHECKS[name] = lambda value, checked: _need_bool(name, value)


def _callable_option(name: str) -> None:
    CHECKS[name] = lambda value, checked: _need_callable(name, value)


def make_config(sources: tuple[Any, ...], **options: Unpack[LoaderOptions]) -> LoaderConfig:
    """Validate the user's sources and options (any of ``LoaderOptions``; ``DEFAULTS`` for the
    rest) and return the loader's configuration. A bad value raises ``TypeError`` or ``ValueError``
    naming the option; an unknown option raises ``TypeError`` naming it."""
    _reject_unknown(options)
    _check_sources(sources)
    given = {**DEFAULTS, **options}
    checked: dict[str, Any] = {"sources": tuple(sources), "provenance": (), "auto_workers": False}
    for name in DEFAULTS:  # LoaderConfig's fields, in order
        checked[name] = CHECKS[name](given[name], checked)
    config = LoaderConfig(**{name: checked[name] for name in ("sources", *DEFAULTS, "provenance", "auto_workers")})
    return config if given["prefetch"] is not None else size_prefetch(config)


def _reject_unknown(options: Mapping[str, Any]) -> None:
    """``TypeError`` for an option ``Loader`` does not have, as Python words it for a keyword argument."""
    import difflib

    for name in options:
        if name not in DEFAULTS:
            close = difflib.get_close_matches(name, DEFAULTS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"Loader() got an unexpected keyword argument {name!r}{hint}")


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


# --- the kinds of value ----------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    """Any integer (``int``, ``np.int64``, ``np.uint8``, ...: every ``numbers.Integral``), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _need_int(name: str, value: Any, minimum: int, what: str) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int {what}; got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int {what}; got {value!r}")
    return int(value)


def _need_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r} ({type(value).__name__})")
    return value


def _need_callable(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable or None; got {value!r} ({type(value).__name__})")
    return value


# --- the options a kind alone checks -----------------------------------------------------------------

_int_option("batch_size", 1, ">= 1")
_callable_option("load")
_callable_option("transform")
_callable_option("batch_transform")
_int_option("retries", 0, ">= 0 (times a batch is redone after its worker died)")
_bool_option("hedge")
_bool_option("limit_threads")
CHECKS["cache_bytes"] = lambda value, checked: None if value is None else _need_int("cache_bytes", value, 0, ">= 0")


# --- the stream: which samples make up each batch ------------------------------------------------


@_checks_option
def _check_shuffle(shuffle: Any, checked: dict[str, Any]) -> bool | str:
    if isinstance(shuffle, bool) or (isinstance(shuffle, str) and shuffle == "block"):
        return shuffle
    error = ValueError if isinstance(shuffle, str) else TypeError
    raise error(f"shuffle must be True, False or 'block'; got {shuffle!r} ({type(shuffle).__name__})")


@_checks_option
def _check_block_size(block_size: Any, checked: dict[str, Any]) -> int | None:
    """Samples per block of ``shuffle="block"`` (its default when None); refused with any other shuffle,
    where it would do nothing."""
    shuffle = checked["shuffle"]
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


@_checks_option
def _check_world_size(world_size: Any, checked: dict[str, Any]) -> int:
    n = len(checked["sources"][0])
    world_size = _need_int("world_size", world_size, 1, ">= 1")
    if world_size > n:
        raise ValueError(
            f"world_size={world_size} is larger than the data ({n} samples): some ranks would get none; "
            f"world_size must be between 1 and {n}"
        )
    return world_size


@_checks_option
def _check_rank(rank: Any, checked: dict[str, Any]) -> int:
    world_size = checked["world_size"]
    rank = _need_int("rank", rank, 0, f"in [0, world_size={world_size})")
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank}")
    return rank


@_checks_option
def _check_seed(seed: Any, checked: dict[str, Any]) -> int:
    """Sharding splits one permutation among the ranks: they must agree on its seed (never draw their own)."""
    world_size = checked["world_size"]
    if world_size > 1 and seed is None:
        raise ValueError(
            f"seed=None with world_size={world_size} (this is rank {checked['rank']}): each rank would draw a "
            "seed of its own and shuffle differently, so the ranks' shards would overlap and miss samples. Pass "
            "the same seed on every rank, e.g. seed=1234 on every rank, or your training script's own seed"
        )
    if seed is None:
        import secrets

        seed = secrets.randbits(63)
    return _need_int("seed", seed, 0, ">= 0 (or None to draw one)")


@_checks_option
def _check_epochs(epochs: Any, checked: dict[str, Any]) -> int | None:
    if epochs is None:
        return None
    return _need_int("epochs", epochs, 1, ">= 1 (or None for an endless stream)")


@_checks_option
def _check_last_batch(last_batch: Any, checked: dict[str, Any]) -> str:
    if last_batch not in LAST_BATCH_MODES:
        raise ValueError(f"last_batch must be one of {', '.join(map(repr, LAST_BATCH_MODES))}; got {last_batch!r}")
    _check_batch_fits_shard({**checked, "last_batch": last_batch})
    return str(last_batch)


def _check_batch_fits_shard(stream: Mapping[str, Any]) -> None:
    """A batch larger than the rank's shard: an error when no batch would come, else a warning (once)."""
    batch_size, world_size, last_batch = stream["batch_size"], stream["world_size"], stream["last_batch"]
    shard = len(stream["sources"][0]) // world_size
    if batch_size <= shard:
        return
    if last_batch == "drop":
        raise ValueError(
            f"last_batch='drop' with batch_size={batch_size} larger than the {shard} samples of "
            "this rank's shard would never yield a batch; use a smaller batch_size or last_batch='short'/'wrap'"
        )
    what = "the data" if world_size == 1 else f"rank {stream['rank']}'s shard"
    if last_batch == "short":
        happens = f"with last_batch='short' every batch is a whole epoch of {shard} samples, not {batch_size}"
    else:
        happens = (
            "with last_batch='wrap' each batch is completed from the next epochs, so it holds some samples "
            "more than once"
        )
    warn(
        f"batch_size={batch_size} is larger than the {shard} samples of {what}: {happens}. "
        f"Use batch_size <= {shard} to get batches of distinct samples."
    )


# --- the user's code: what makes a batch out of samples --------------------------------------------


@_checks_option
def _check_collate(collate: Any, checked: dict[str, Any]) -> str | Callable[[list[Any]], Any]:
    if not callable(collate) and collate not in COLLATE_MODES:
        raise ValueError(f"collate must be 'auto', 'list' or a callable; got {collate!r}")
    return collate


_int_option("io_threads", 1, ">= 1 (threads loading a batch's samples at once; 1: one after another)")


# --- how batches are made: processes, depth, time limits, CPU sharing ------------------------------


@_checks_option
def _check_local_ranks(local_ranks: Any, checked: dict[str, Any]) -> int:
    if local_ranks is not None:
        local_ranks = _need_int("local_ranks", local_ranks, 1, ">= 1 (ranks on this node) or None (LOCAL_WORLD_SIZE)")
    ranks = checked["ranks"] = _budget.local_ranks(local_ranks)
    if ranks.ignored is not None:
        warn(
            f"{_budget.LOCAL_RANKS_VAR}={ranks.ignored!r} is not an int >= 1, so it is ignored: the loader sizes its "
            "workers and memory as if this were the only rank on the node. Pass local_ranks=<ranks on this node>, "
            f"or fix {_budget.LOCAL_RANKS_VAR} in the launcher's environment"
        )
    return ranks.count


@_checks_option
def _check_workers(workers: Any, checked: dict[str, Any]) -> int:
    auto = checked["auto_workers"] = isinstance(workers, str) and workers == "auto"
    if workers is None or auto:  # "auto": the budget is forked, and given tasks as the figures say (core.autoscale)
        budget = _budget.cpu_budget(checked["ranks"])
        workers, said = budget.cpus, budget.describe()
    else:
        workers, said = _need_int("workers", workers, 0, ">= 0 (0 runs in-process), None or 'auto'"), "as given"
    checked["provenance"] += (f"workers={'auto, at most ' if auto else ''}{workers}: {said}",)
    return workers


@_checks_option
def _check_prefetch(prefetch: Any, checked: dict[str, Any]) -> int:
    """The depth; a default one (per worker) is bounded by the bytes it takes afterwards (``sizing.size_prefetch``)."""
    workers = checked["workers"]
    if prefetch is None:
        per_worker = SMALL_POOL_PREFETCH_PER_WORKER if workers < SMALL_POOL_WORKERS else PREFETCH_PER_WORKER
        checked["provenance"] += (f"{per_worker} per worker",)
        return per_worker * max(workers, 1)
    prefetch = _need_int("prefetch", prefetch, 1, ">= 1 (batches ready or in flight)")
    checked["provenance"] += (f"prefetch={prefetch}: as given",)
    return prefetch


@_checks_option
def _check_start_method(start_method: Any, checked: dict[str, Any]) -> str | None:
    import multiprocessing  # lazily: `import prefetch` stays fast

    methods = multiprocessing.get_all_start_methods()
    if start_method is not None and start_method not in methods:
        accepted = ", ".join(map(repr, methods))
        raise ValueError(f"start_method must be None or one of {accepted} on this platform; got {start_method!r}")
    return start_method


@_checks_option
def _check_timeout(timeout: Any, checked: dict[str, Any]) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds > 0 or None; got {timeout!r} ({type(timeout).__name__})")
    seconds = float(timeout)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"timeout must be a finite number of seconds > 0 or None; got {timeout!r}")
    return seconds


@_checks_option
def _check_worker_nice(worker_nice: Any, checked: dict[str, Any]) -> int | str:
    if isinstance(worker_nice, str) and worker_nice == "auto":
        return worker_nice
    worker_nice = _need_int(
        "worker_nice", worker_nice, 0, "in [0, 19] or 'auto' (0: workers as urgent as the training loop)"
    )
    if worker_nice > 19:
        raise ValueError(f"worker_nice must be an int in [0, 19] or 'auto'; got {worker_nice}")
    return worker_nice


@_checks_option
def _check_train_threads(train_threads: Any, checked: dict[str, Any]) -> str | int | None:
    if train_threads == "auto" or train_threads is None:
        return train_threads
    return _need_int("train_threads", train_threads, 1, ">= 1, 'auto' or None")


@_checks_option
def _check_executor(executor: Any, checked: dict[str, Any]) -> Any:
    """A name (``"processes"``, ``"ray"``) or an executor object, kept as given."""
    accepted = f"one of {', '.join(map(repr, EXECUTORS))} or an executor object"
    if isinstance(executor, str):
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be {accepted}; got {executor!r}")
    elif executor is None or isinstance(executor, (bool, numbers.Number)):
        raise TypeError(f"executor must be {accepted}; got {executor!r} ({type(executor).__name__})")
    return executor


@_checks_option
def _check_cache(cache: Any, checked: dict[str, Any]) -> str | None:
    if cache is not None and cache != "memory" and not isinstance(cache, (str, os.PathLike)):
        raise TypeError(f"cache must be None, 'memory' or a directory path; got {cache!r} ({type(cache).__name__})")
    if cache is None and checked["cache_bytes"] is not None:
        raise ValueError(f"cache_bytes={checked['cache_bytes']!r} limits a cache: pass cache='memory' or a directory")
    return cache if cache in (None, "memory") else os.path.abspath(os.fspath(cache))
