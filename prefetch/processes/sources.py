"""Sources shared with a spawned coordinator: numpy arrays travel as small handles, not pickles.

Under fork the coordinator and its workers inherit the sources as they are. Under spawn or
forkserver the configuration is pickled to the coordinator, and a large numpy source would
be pickled with it -- copied through a pipe, and then once more per process. Instead,
``share_sources`` (in the consumer, before the start) replaces

* a ``np.memmap`` by a ``MemmapFile``: the file is reopened, read-only, where it is needed;
* any other plain numpy array by a ``SharedArray``: it is copied once into a segment
  (``segments``) named under the loader's prefix;

and ``resolve_sources`` (in the coordinator) turns the handles back into read-only arrays,
which the workers it forks inherit. A segment mapped there is unlinked at once: it lives as
long as the mappings do, and never outlives the processes that use it.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.config import LoaderConfig
from ..errors import ShmSpaceError
from ..ipc.segments import PAGE_BYTES, SegmentRef, align, buffer_address, create_segment, open_segment, unlink_segment


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
    position = start + int(source.ctypes.data) - buffer_address(mapped)
    return MemmapFile(str(source.filename), position, source.shape, source.strides, source.dtype)


# What to do when /dev/shm cannot hold the copy of a numpy source (also the pre-flight check's advice).
SOURCE_COPY_FIX = (
    "np.memmap the source from a file (it is then reopened, not copied), give /dev/shm more room (Docker: "
    '--shm-size), or start_method="fork" (the sources are then inherited, never copied)'
)


def copy_purpose(position: int, source: np.ndarray) -> tuple[str, str]:
    """What the segment of source ``position`` holds, and the fix when it does not fit (``create_segment``)."""
    what = (
        f"the copy of the data set that start_method spawn/forkserver makes there: source {position}, "
        f"{source.nbytes / 2**20:.1f} MiB ({source.dtype} {source.shape})"
    )
    return what, SOURCE_COPY_FIX


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
            try:
                mm = create_segment(name, align(size, PAGE_BYTES), copy_purpose(position, handle))
            except OSError as exc:
                raise ShmSpaceError(exc.errno, exc.strerror) from exc
            target = np.frombuffer(mm, np.uint8, count=handle.nbytes).view(handle.dtype).reshape(handle.shape)
            np.copyto(target, handle)
            del target
            mm.close()
            handle = SharedArray(name, align(size, PAGE_BYTES), handle.shape, handle.dtype)
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


def ship_config(config: LoaderConfig) -> bytes:
    """The configuration pickled for a coordinator that is spawned (not forked): with dill, so lambdas and
    closures travel. Arrays and dtypes inside it (a list of arrays as a source, an array in a closure) go
    through numpy's own protocol-5 reduction: dill's rebuilds an array of non-native byte order ('>i4')
    with the native one."""
    import io

    import dill

    class ConfigPickler(dill.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if type(obj) is np.ndarray or isinstance(obj, np.dtype):
                return obj.__reduce_ex__(5)
            return NotImplemented

    buffer = io.BytesIO()
    ConfigPickler(buffer, protocol=5).dump(config)
    return buffer.getvalue()
