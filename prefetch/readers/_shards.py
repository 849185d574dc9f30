"""What the sharded readers share: the paths, the stamp of each shard, the per-process cache of open shards,
indexing many shards at once, and the one way they say a shard is bad (``ShardError``).

A reader is built once, in the user's process, from the shards' headers or footers; what it keeps is small
(paths, stamps, numpy index arrays) and is what travels to spawned processes and Ray actors. What it opens
(descriptors, mappings, Parquet files, decoded row groups) belongs to the process that opened it: after a
fork, the child finds the pid changed and opens its own. See docs/design.md, "Readers".
"""

from __future__ import annotations

import operator
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import numpy as np

from ..errors import ShardError

# Shards indexed at once. Reading a header or a footer is a small read whose latency (a network file system,
# object storage through FUSE, a cold disk) dominates, and threads overlap those waits; parsing holds the GIL,
# so on a warm page cache more threads gain nothing (and cost little: they end with the construction).
INDEX_THREADS = 16

Handle = TypeVar("Handle")


def as_paths(paths: Iterable[str | os.PathLike[str]], reader: str) -> list[str]:
    """The shard paths as strings; a single path (a common slip) is refused with the fix."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(
            f"{reader} takes a sequence of shard paths, not one path ({os.fsdecode(paths)!r}); "
            f"for one shard pass [path], for a directory e.g. sorted(glob.glob('dir/*'))"
        )
    return [os.fsdecode(os.fspath(path)) for path in paths]


def stamp(path: str) -> tuple[int, int]:
    """``(size in bytes, mtime in ns)`` of a shard, recorded when it is indexed."""
    try:
        status = os.stat(path)
    except OSError as exc:
        raise ShardError(f"shard {path!r} cannot be read: {exc.strerror or exc}", path=path) from exc
    return status.st_size, status.st_mtime_ns


def check_stamp(path: str, recorded: tuple[int, int], now: tuple[int, int], reader: str) -> None:
    """Refuse a shard that is not the file its index was built from (replaced, grown, truncated, rewritten)."""
    if tuple(now) == tuple(recorded):
        return
    size, mtime_ns = recorded
    new_size, new_mtime_ns = now
    raise ShardError(
        f"shard {path!r} changed since the {reader} index was built: {size} -> {new_size} bytes, modified "
        f"{mtime_ns} -> {new_mtime_ns} ns; its index describes the old file. Build {reader}(paths) again "
        "after the shards change (and start a new loader with it)",
        path=path,
    )


def naming_sample(exc: ShardError, i: int) -> ShardError:
    """``exc`` (raised while opening a shard) with the sample that was being read named in it."""
    named = ShardError(f"{exc} (while reading sample {i})", path=exc.path, index=i, key=exc.key)
    named.__cause__ = exc.__cause__
    return named


def in_parallel(function: Callable[[str], Any], paths: Sequence[str]) -> list[Any]:
    """``[function(path) for path in paths]``, ``INDEX_THREADS`` at a time; the first error (in path order) raised.
    The threads end before this returns: no thread is left running when a loader later forks."""
    if len(paths) <= 1:
        return [function(path) for path in paths]
    with ThreadPoolExecutor(max_workers=min(INDEX_THREADS, len(paths)), thread_name_prefix="prefetch-index") as pool:
        return list(pool.map(function, paths))


def starts_of(counts: Iterable[int]) -> np.ndarray:
    """Cumulative starts: ``starts[k]`` is the first global number of part ``k``; the last entry is the total."""
    return np.concatenate([[0], np.cumsum(np.fromiter(counts, np.int64))]).astype(np.int64)


def locate(starts: np.ndarray, index: Any, length: int) -> tuple[int, int]:
    """``(part, i)``: the part holding sample ``index`` and its number ``i`` in ``[0, length)`` (a negative
    ``index`` counts from the end, as a sequence's does)."""
    i = operator.index(index)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"index {index} out of range for {length} samples")
    return int(np.searchsorted(starts, i, side="right")) - 1, i


def compact(values: np.ndarray) -> np.ndarray:
    """``values`` (non-negative integers) in the smallest of uint8, uint16, uint32 and int64 that holds them:
    the index of a shard under 4 GiB then costs 4 bytes per offset. Read its entries with ``int()``: numpy
    arithmetic on small unsigned types would wrap."""
    top = int(values.max()) if len(values) else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return values.astype(np.int64)


class Opened(Generic[Handle]):
    """This process's open shards, least recently used first, at most ``capacity`` of them.

    ``get(k)`` returns shard ``k``'s handle, made by ``open(k)`` (which checks the shard's stamp) on a miss.
    Handles are objects that close themselves when the last reference goes (a ``FileIO``, a mapping, a
    Parquet file): one evicted while another thread still reads through it stays open until that read is
    done. They are this process's only: in a forked child (the pid changed) the inherited ones are dropped --
    which closes the child's copies and leaves the parent's alone -- and the child opens its own. Never
    pickled (see the readers' ``__getstate__``).
    """

    def __init__(self, capacity: int, open: Callable[[int], Handle]):
        self._capacity = capacity
        self._open = open
        self._pid = os.getpid()
        self._handles: OrderedDict[int, Handle] = OrderedDict()
        self._lock = threading.Lock()  # several loading threads in one worker share the cache

    def get(self, shard: int) -> Handle:
        with self._lock:
            if self._pid != os.getpid():  # forked: the handles are the parent's
                self._handles.clear()
                self._pid = os.getpid()
            handle = self._handles.get(shard)
            if handle is not None:
                self._handles.move_to_end(shard)
                return handle
        handle = self._open(shard)  # outside the lock: an open may wait on a network file system
        with self._lock:
            self._handles[shard] = handle
            while len(self._handles) > self._capacity:
                self._handles.popitem(last=False)
        return handle

    def __len__(self) -> int:
        return len(self._handles)

    @property
    def pid(self) -> int:
        """The process whose handles these are."""
        return self._pid
