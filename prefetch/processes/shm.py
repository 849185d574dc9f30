"""Shared memory: the slots batches are written into, and sources shared with spawned processes.

A *slot* is a numbered place for one batch. Its bytes live in a *segment*, a file
in the shm directory (``/dev/shm`` on Linux) that the worker making the batch and
the consumer both map. Ownership moves with the messages:

* the coordinator hands a free slot to a worker with each ``Task``;
* the worker writes the batch's arrays into it (``SlotWriter``) -- stacking straight
  into the slot where it can -- and creates a larger segment when the batch does not
  fit (the old one is unlinked; segment names are never reused);
* the consumer maps it and builds arrays that *view* the slot (``SlotReader``): no
  copy. A per-batch *lease* array is the base of every array of the batch, and the
  slot goes back to the coordinator only when the lease is garbage, i.e. when the
  user holds no array of the batch any more.

Every segment of a loader is named ``prefetch-<consumer pid>-<token>-...``, so
cleanup never needs a list: whoever shuts down last unlinks the prefix
(``unlink_prefix``), and a later loader removes the prefixes of dead consumers
(``remove_stale_segments``). Segments are allocated with ``posix_fallocate``, so a
full ``/dev/shm`` fails at once with ``ENOSPC`` instead of a ``SIGBUS`` later.
"""

from __future__ import annotations

import fcntl
import io
import math
import mmap
import os
import pickle
import secrets
import tempfile
from dataclasses import dataclass
from itertools import count
from typing import Any

import numpy as np
import psutil

from .messages import SegmentRef, SlotArrays, SlotLayout

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
NAME_ROOT = "prefetch-"
# Arrays in a slot start at multiples of this, so SIMD loads and stores stay aligned.
ALIGN_BYTES = 64
# A pickled batch payload larger than this goes into the slot too, so that the
# message pipes only ever carry small messages.
INLINE_PAYLOAD_MAX_BYTES = 16 * 1024
PAGE_BYTES = mmap.PAGESIZE


def _align(n: int, to: int = ALIGN_BYTES) -> int:
    return (n + to - 1) // to * to


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def create_segment(name: str, size: int) -> mmap.mmap:
    """Create segment ``name`` of ``size`` bytes (reserved now: ``ENOSPC`` here, not SIGBUS later)."""
    fd = os.open(_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.unlink(_path(name))
            raise OSError(
                exc.errno,
                f"cannot reserve {size / 2**20:.1f} MiB in {SHM_DIR} for a batch ({exc.strerror}); "
                "free space there, lower `prefetch` or the batch size (Docker: --shm-size)",
            ) from exc
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def open_segment(ref: SegmentRef) -> mmap.mmap:
    fd = os.open(_path(ref.name), os.O_RDWR)
    try:
        return mmap.mmap(fd, ref.size)
    finally:
        os.close(fd)


def unlink_segment(name: str) -> None:
    try:
        os.unlink(_path(name))
    except FileNotFoundError:
        pass


def new_prefix(token: str) -> str:
    return f"{NAME_ROOT}{os.getpid()}-{token}-"


# The file, beside a prefix's segments, whose flock says that their owner is alive.
LOCK_NAME = "lock"
# How many fresh tokens ``claim_prefix`` tries before it gives up (each try fails only if a
# sweep in another process took the brand-new lock file in the instant before its flock).
CLAIM_ATTEMPTS = 16


class PrefixLock:
    """The owner's claim on a prefix: an exclusive ``flock`` on ``<prefix>lock`` in the shm directory.

    A process ID says nothing across PID namespaces (two containers sharing ``/dev/shm``), but
    a lock does: the kernel holds it for the owner's open file, whatever namespace either side
    is in, and drops it when the owner dies, however it dies. ``remove_stale_segments`` removes a
    prefix's segments only once it can take the lock itself. Processes forked while the lock is
    held (the coordinator and workers under fork) share it, so it lasts while any of them lives.
    """

    def __init__(self, prefix: str, fd: int):
        self.prefix = prefix
        self._fd: int | None = fd
        self._owner_pid = os.getpid()

    def release(self) -> None:
        """Unlink every segment of the prefix, then the lock file, then drop the lock. Idempotent.
        In a process forked from the owner (which has a copy of this object) it only closes that
        process's copy of the descriptor: the segments are the owner's."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if os.getpid() == self._owner_pid:
                unlink_prefix(self.prefix)  # the lock file last: the segments are never left unclaimed
        finally:
            os.close(fd)

    def __del__(self) -> None:  # an engine that failed while starting: release what it had
        if getattr(self, "_fd", None) is not None:
            self.release()


def _is_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a sweep may have unlinked it)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)


def claim_prefix() -> PrefixLock:
    """A fresh prefix for this process's segments, with its lock taken (before any segment exists)."""
    for _ in range(CLAIM_ATTEMPTS):
        prefix = new_prefix(secrets.token_hex(4))
        path = _path(prefix + LOCK_NAME)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except FileExistsError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            claimed = _is_file(fd, path)
        except BlockingIOError:  # a sweep holds it for a moment: it will remove it
            claimed = False
        if claimed:
            return PrefixLock(prefix, fd)
        os.close(fd)
    raise OSError(f"could not create a lock file for shared memory in {SHM_DIR}")


def unlink_prefix(prefix: str) -> int:
    """Unlink every segment whose name starts with ``prefix`` (its lock file last); return how many."""
    lock = prefix + LOCK_NAME
    names = sorted((name for name in os.listdir(SHM_DIR) if name.startswith(prefix)), key=lambda name: name == lock)
    for name in names:
        unlink_segment(name)
    return len(names)


def _owner_prefix(name: str) -> tuple[str, str] | None:
    """``(prefix, pid)`` of a segment name ``prefetch-<pid>-<token>-...``; None for other names."""
    parts = name[len(NAME_ROOT) :].split("-", 2)
    if not name.startswith(NAME_ROOT) or len(parts) < 3 or not parts[0].isdigit():
        return None
    return f"{NAME_ROOT}{parts[0]}-{parts[1]}-", parts[0]


def _owner_is_gone(prefix: str) -> bool:
    """Whether the lock of ``prefix`` can be taken (its owner died); a lock file that vanished
    meanwhile means its owner is removing its segments itself."""
    try:
        fd = os.open(_path(prefix + LOCK_NAME), os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:  # held until the segments and the lock file are gone, so that no other sweep races this one
        unlink_prefix(prefix)
    finally:
        os.close(fd)
    return True


def remove_stale_segments() -> int:
    """Unlink segments left by owners that are gone (a consumer killed with SIGKILL, ...); return how many owners.

    A prefix with a lock file is removed only when its lock can be taken (``PrefixLock``), which
    works across PID namespaces. A prefix without one (left by an older version, or whose owner is
    removing it right now) is removed when no process of its pid is visible here.
    """
    prefixes: dict[str, str] = {}
    for name in os.listdir(SHM_DIR):
        owner = _owner_prefix(name)
        if owner is not None:
            prefixes[owner[0]] = owner[1]
    removed = 0
    for prefix, pid in prefixes.items():
        if os.path.exists(_path(prefix + LOCK_NAME)):
            if _owner_is_gone(prefix):
                removed += 1
        elif not psutil.pid_exists(int(pid)):
            unlink_prefix(prefix)
            removed += 1
    return removed


def _address(buffer: Any) -> int:
    return int(np.frombuffer(buffer, np.uint8).ctypes.data)


# --- the worker side ----------------------------------------------------------------------


class _Mapping:
    """One worker's mapping of a slot's segment."""

    def __init__(self, ref: SegmentRef, mm: mmap.mmap):
        self.ref = ref
        self.mm = mm
        self.view = np.frombuffer(mm, np.uint8)
        self.base = int(self.view.ctypes.data)

    def close(self) -> None:
        del self.view
        try:
            self.mm.close()
        except BufferError:  # an array of a batch still views it: unmapped when that array goes
            pass


class BatchSpace:
    """The free space of one slot while a batch is written: a bump allocator that
    remembers where each array it handed out lies."""

    def __init__(self, mapping: _Mapping | None):
        self.mapping = mapping
        self.used = 0
        self._placed: dict[int, tuple[np.ndarray, int]] = {}  # id -> (array, offset)

    def reserve(self, nbytes: int) -> int | None:
        """Offset of ``nbytes`` fresh bytes in the slot, or None when they do not fit."""
        if self.mapping is None:
            return None
        offset = _align(self.used)
        if offset + nbytes > self.mapping.ref.size:
            return None
        self.used = offset + nbytes
        return offset

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An array in the slot when it fits, else in private memory (copied in at the end)."""
        dtype = np.dtype(dtype)
        offset = None if dtype.hasobject else self.reserve(math.prod(shape) * dtype.itemsize)
        if offset is None or self.mapping is None:
            return np.empty(shape, dtype)
        array = np.ndarray(shape, dtype, buffer=self.mapping.view, offset=offset)
        self._placed[id(array)] = (array, offset)
        return array

    def holds(self, address: int, nbytes: int) -> bool:
        m = self.mapping
        return m is not None and m.base <= address and address + nbytes <= m.base + m.ref.size

    def _where(self, leaf: Any) -> tuple[int, str, tuple[int, ...]] | None:
        entry = self._placed.get(id(leaf))
        if entry is None or entry[0] is not leaf or not leaf.flags.c_contiguous:
            return None
        if leaf.dtype.names is not None or leaf.dtype.subdtype is not None:  # dtype.str would lose fields
            return None
        return entry[1], leaf.dtype.str, leaf.shape

    def describe(self, batch: Any) -> SlotArrays | None:
        """``batch`` as ``SlotArrays`` if it is one array, a tuple or a str-keyed dict of arrays
        that ``alloc`` placed in the slot (and nothing else); None otherwise."""
        keys: tuple[str, ...] = ()
        if type(batch) is tuple:
            container, leaves = "tuple", batch
        elif type(batch) is dict:
            container, keys, leaves = "dict", tuple(batch), tuple(batch.values())
            if not all(type(key) is str for key in keys):
                return None
        else:
            container, leaves = "array", (batch,)
        arrays = []
        for leaf in leaves:
            where = self._where(leaf)
            if where is None:
                return None
            arrays.append(where)
        return SlotArrays(container, keys, tuple(arrays))


class _BatchPickler(pickle.Pickler):
    """Pickles a batch with its arrays out of band. Non-contiguous arrays are first made contiguous in the
    slot, and so are read-only ones (a view of a source shared read-only with spawned workers): pickle
    would otherwise carry the read-only flag to the consumer, whose arrays must be writable."""

    def __init__(self, file: io.BytesIO, space: BatchSpace, buffers: list[pickle.PickleBuffer]):
        super().__init__(file, protocol=5, buffer_callback=buffers.append)
        self._space = space

    def reducer_override(self, obj: Any) -> Any:
        if (
            type(obj) is np.ndarray
            and not obj.dtype.hasobject
            and (not (obj.flags.c_contiguous or obj.flags.f_contiguous) or not obj.flags.writeable)
        ):
            contiguous = self._space.alloc(obj.shape, obj.dtype)
            np.copyto(contiguous, obj)
            return contiguous.__reduce_ex__(5)
        return NotImplemented


class SlotWriter:
    """A worker's writer into slots; keeps each slot's segment mapped between batches."""

    def __init__(self, prefix: str):
        self._prefix = prefix
        self._maps: dict[int, _Mapping] = {}
        self._names = count()

    def space(self, slot: int, segment: SegmentRef | None, size_hint: int) -> BatchSpace:
        """The space to build a batch in, for a task that names ``slot`` and its current segment."""
        mapping = self._maps.get(slot)
        if segment is None:
            if mapping is None and size_hint > 0:
                mapping = self._create(slot, size_hint, old=None)
        elif mapping is None or mapping.ref != segment:
            try:
                mapping = _Mapping(segment, open_segment(segment))
            except FileNotFoundError:  # replaced by a batch whose report was lost: start afresh
                mapping = self._create(slot, max(size_hint, segment.size), old=None)
            self._maps[slot] = mapping
        return BatchSpace(mapping)

    def close(self) -> None:
        """Unmap every slot this writer keeps mapped (the segments themselves stay)."""
        maps, self._maps = self._maps, {}
        for mapping in maps.values():
            mapping.close()

    def _create(self, slot: int, size: int, old: _Mapping | None) -> _Mapping:
        name = f"{self._prefix}{slot}-{os.getpid()}-{next(self._names)}"
        size = max(_align(size, PAGE_BYTES), PAGE_BYTES)  # at least a page: a batch of 0-byte arrays still has a slot
        ref = SegmentRef(name, size)
        mapping = _Mapping(ref, create_segment(name, size))
        if old is not None:
            unlink_segment(old.ref.name)
        self._maps[slot] = mapping
        return mapping

    def write(self, slot: int, space: BatchSpace, batch: Any) -> SlotLayout:
        """Put ``batch`` in the slot: arrays out of band (growing the slot if needed), the rest pickled."""
        arrays = space.describe(batch)
        if arrays is not None:  # already in the slot: nothing to write
            assert space.mapping is not None
            return SlotLayout(space.mapping.ref, None, (), arrays)
        buffers: list[pickle.PickleBuffer] = []
        file = io.BytesIO()
        _BatchPickler(file, space, buffers).dump(batch)
        payload = file.getvalue()
        raws = [buffer.raw() for buffer in buffers]
        if len(payload) > INLINE_PAYLOAD_MAX_BYTES:
            raws.append(memoryview(payload))
        if not raws:
            return SlotLayout(None, payload, ())
        placed: list[tuple[int, int]] = []
        for raw in raws:
            nbytes = raw.nbytes
            if nbytes and space.holds(_address(raw), nbytes):
                assert space.mapping is not None
                placed.append((_address(raw) - space.mapping.base, nbytes))
                continue
            offset = space.reserve(nbytes)
            if offset is None:
                return self._write_grown(slot, space, payload, raws)
            assert space.mapping is not None
            space.mapping.view[offset : offset + nbytes] = np.frombuffer(raw, np.uint8)
            placed.append((offset, nbytes))
        assert space.mapping is not None
        inline = None if len(raws) > len(buffers) else payload
        return SlotLayout(space.mapping.ref, inline, tuple(placed))

    def _write_grown(self, slot: int, space: BatchSpace, payload: bytes, raws: list[memoryview]) -> SlotLayout:
        needed = sum(_align(raw.nbytes) for raw in raws)
        old = space.mapping
        size = needed if old is None else max(needed, old.ref.size + old.ref.size // 4)
        mapping = self._create(slot, size, old=old)
        placed, offset = [], 0
        for raw in raws:
            nbytes = raw.nbytes
            mapping.view[offset : offset + nbytes] = np.frombuffer(raw, np.uint8)
            placed.append((offset, nbytes))
            offset = _align(offset + nbytes)
        inline = None if len(payload) > INLINE_PAYLOAD_MAX_BYTES else payload
        return SlotLayout(mapping.ref, inline, tuple(placed))


# --- the consumer side --------------------------------------------------------------------


class SlotReader:
    """The consumer's reader of slots; keeps each slot's segment mapped until ``close``.

    A mapping is shared by the reader (its cache) and by the arrays of every batch read from it
    (their numpy base is the ``mmap``), so it is unmapped, and its descriptor closed, when both
    have let go: ``close`` drops the cache and unmaps at once what no batch uses; a mapping a
    batch the user holds still uses goes when the user drops the last array of that batch.
    """

    def __init__(self) -> None:
        self._maps: dict[int, tuple[SegmentRef, mmap.mmap]] = {}

    def close(self) -> None:
        """Let go of every mapping (see the class docstring); the reader may still be used afterwards."""
        maps, self._maps = self._maps, {}
        for _, mm in maps.values():
            try:
                mm.close()
            except BufferError:  # a batch the user holds views it: unmapped when that batch is dropped
                pass

    def read(self, slot: int, layout: SlotLayout, lease: bool) -> tuple[Any, np.ndarray | None]:
        """Rebuild a batch. With ``lease`` its arrays view the slot, and the returned lease
        array is their common base; without, they are copies and the slot is free at once."""
        segment, payload, buffers, arrays = layout
        if segment is None:
            assert payload is not None
            return pickle.loads(payload), None
        cached = self._maps.get(slot)
        if cached is None or cached[0] != segment:
            if cached is not None:  # the slot grew into a new segment: let the old one go
                try:
                    cached[1].close()
                except BufferError:  # still viewed by a held batch, unmapped when that goes
                    pass
            cached = (segment, open_segment(segment))
            self._maps[slot] = cached
        if arrays is not None:
            whole = np.frombuffer(cached[1], np.uint8)
            leaves = [np.ndarray(shape, dtype, buffer=whole, offset=offset) for offset, dtype, shape in arrays.arrays]
            if not lease:
                leaves = [leaf.copy() for leaf in leaves]
            if arrays.container == "tuple":
                batch: Any = tuple(leaves)
            elif arrays.container == "dict":
                batch = dict(zip(arrays.keys, leaves, strict=True))
            else:
                batch = leaves[0]
            return batch, (whole if lease else None)
        end = max(offset + nbytes for offset, nbytes in buffers)
        whole = np.frombuffer(cached[1], np.uint8, count=max(end, 1))
        views = [whole[offset : offset + nbytes] for offset, nbytes in buffers]
        data: Any = payload if payload is not None else views.pop()
        if not lease:
            views = [view.copy() for view in views]
        return pickle.loads(data, buffers=views), (whole if lease else None)


# --- sources shared with spawned processes ------------------------------------------------


@dataclass(frozen=True)
class SharedArray:
    """A numpy source copied once into a segment, for a coordinator started by spawn/forkserver."""

    name: str
    size: int
    shape: tuple[int, ...]
    dtype: np.dtype  # the dtype itself: its str form loses a structured dtype's fields


@dataclass(frozen=True)
class MemmapFile:
    """A ``np.memmap`` source, reopened read-only from its file by the coordinator."""

    filename: str
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: np.dtype


def _memmap_file(source: np.memmap) -> MemmapFile | None:
    mapped = getattr(source, "_mmap", None)
    if mapped is None or source.filename is None or any(s < 0 for s in source.strides):
        return None
    start = source.offset - source.offset % mmap.ALLOCATIONGRANULARITY
    position = start + int(source.ctypes.data) - _address(mapped)
    return MemmapFile(str(source.filename), position, source.shape, source.strides, source.dtype)


def share_sources(sources: tuple[Any, ...], prefix: str) -> tuple[Any, ...]:
    """Replace numpy sources by small handles before the coordinator is spawned (others pickle as they are)."""
    shared: list[Any] = []
    for position, source in enumerate(sources):
        handle: Any = source
        if isinstance(source, np.memmap):
            handle = _memmap_file(source) or source
        if isinstance(handle, np.ndarray) and not handle.dtype.hasobject:
            name = f"{prefix}source{position}"
            size = max(handle.nbytes, 1)
            mm = create_segment(name, _align(size, PAGE_BYTES))
            target = np.frombuffer(mm, np.uint8, count=handle.nbytes).view(handle.dtype).reshape(handle.shape)
            np.copyto(target, handle)
            del target
            mm.close()
            handle = SharedArray(name, _align(size, PAGE_BYTES), handle.shape, handle.dtype)
        shared.append(handle)
    return tuple(shared)


def resolve_sources(sources: tuple[Any, ...]) -> tuple[Any, ...]:
    """Turn handles back into read-only arrays (in the coordinator; its workers inherit them)."""
    resolved: list[Any] = []
    for source in sources:
        if isinstance(source, SharedArray):
            mm = open_segment(SegmentRef(source.name, source.size))
            unlink_segment(source.name)  # mapped here and inherited by workers: the name is no longer needed
            dtype = np.dtype(source.dtype)
            count = int(np.prod(source.shape, dtype=np.int64))
            source = np.frombuffer(mm, dtype, count=count).reshape(source.shape)
            source.flags.writeable = False
        elif isinstance(source, MemmapFile):
            whole = np.memmap(source.filename, dtype=np.uint8, mode="r")
            source = np.ndarray(
                source.shape, np.dtype(source.dtype), buffer=whole, offset=source.offset, strides=source.strides
            )
        resolved.append(source)
    return tuple(resolved)


# --- messages too large for one atomic pipe write (see _channel) -------------------------


def write_file_segment(name: str, data: bytes) -> SegmentRef:
    with open(_path(name), "xb") as file:
        file.write(data)
    return SegmentRef(name, len(data))


def read_file_segment(ref: SegmentRef) -> bytes:
    with open(_path(ref.name), "rb") as file:
        data = file.read()
    unlink_segment(ref.name)
    return data
