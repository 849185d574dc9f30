"""Sources shared with a spawned coordinator: numpy arrays travel as small handles, not pickles.

Under fork the coordinator and its workers inherit the sources as they are. Under spawn or
forkserver the configuration is pickled to the coordinator, and a large numpy source would
be pickled with it -- copied through a pipe, and then once more per process. Instead,
``share_sources`` (in the consumer, before the start) replaces a ``np.memmap`` by an
``ipc.handles.MemmapFile`` (reopened by path) and any other plain numpy array by an
``ipc.handles.SharedArray`` (copied once into a segment under the loader's prefix), and
``resolve_sources`` (in the coordinator) opens the handles as read-only arrays, which the
workers it forks inherit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.config import LoaderConfig
from ..errors import ShmSpaceError
from ..ipc.handles import MemmapFile, SharedArray

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
            handle = MemmapFile.of(source) or source
        if isinstance(handle, np.ndarray) and not handle.dtype.hasobject:
            try:
                handle = SharedArray.copy_of(handle, f"{prefix}source{position}", copy_purpose(position, handle))
            except OSError as exc:
                raise ShmSpaceError(exc.errno, exc.strerror) from exc
        shared.append(handle)
    return tuple(shared)


def resolve_sources(sources: tuple[Any, ...]) -> tuple[Any, ...]:
    """Turn handles back into read-only arrays (in the coordinator; its workers inherit them)."""
    return tuple(source.open() if isinstance(source, (SharedArray, MemmapFile)) else source for source in sources)


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
