"""``NpyShards``: ``.npy`` files as one array along their first axis, each memory-mapped where it is read.

Built from the files' headers alone (dtype, shape, order, where the data starts); a shard is mapped
read-only the first time a process reads from it, and at most ``MAPPED_SHARDS`` stay mapped per process.
``src[i]`` is row ``i`` of the concatenation, a read-only view of the mapping (as an ``np.memmap`` source's
row is). See docs/design.md, "Readers".
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..errors import ShardError
from . import _shards

# Shards kept mapped per process. A mapping costs address space (free) and one descriptor (Python's mmap
# keeps one per mapping), so this is bounded by the open-files limit rather than by memory.
MAPPED_SHARDS = 64


class _Header:
    """What a shard's ``.npy`` header says: enough to map it without reading its data."""

    def __init__(self, path: str):
        self.path = path
        self.stamp = _shards.stamp(path)
        try:
            with open(path, "rb") as file:
                version = np.lib.format.read_magic(file)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
                else:  # 3.0 (field names beyond latin-1): numpy has no public reader for it
                    shape, fortran, dtype = np.lib.format._read_array_header(file, version)  # type: ignore[attr-defined]
                self.offset = file.tell()
        except (OSError, ValueError, SyntaxError) as exc:
            raise ShardError(f"shard {path!r} is not a .npy file: {exc}", path=path) from exc
        self.shape: tuple[int, ...] = tuple(shape)
        self.fortran: bool = bool(fortran)
        self.dtype: np.dtype = np.dtype(dtype)
        if self.dtype.hasobject:
            raise ShardError(f"shard {path!r} holds Python objects ({self.dtype}): it cannot be mapped", path=path)
        if not self.shape:
            raise ShardError(f"shard {path!r} is a 0-d array: a shard needs a first axis to index", path=path)
        needed = self.offset + int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        if self.stamp[0] < needed:
            raise ShardError(
                f"shard {path!r} is truncated: its header says {self.shape} {self.dtype}, {needed} bytes with the "
                f"header, the file has {self.stamp[0]}",
                path=path,
            )


class NpyShards:
    """``.npy`` files as one source: ``len`` is the sum of their first dimensions, ``src[i]`` the ``i``-th row.

    Every shard must have the same dtype and the same shape past the first axis. Only the headers are read
    here; each process maps the shards it reads, read-only.

    Example::

        images = prefetch.NpyShards(sorted(glob.glob("images-*.npy")))   # e.g. (n_k, 224, 224, 3) uint8 each
        labels = prefetch.NpyShards(sorted(glob.glob("labels-*.npy")))
        loader = prefetch.Loader(images, labels, batch_size=64, seed=0)
    """

    def __init__(self, paths: Iterable[str | os.PathLike[str]]):
        self.paths: list[str] = _shards.as_paths(paths, "NpyShards")
        headers: list[_Header] = _shards.in_parallel(_Header, self.paths)
        if headers:
            first = headers[0]
            for header in headers[1:]:
                if header.dtype != first.dtype or header.shape[1:] != first.shape[1:]:
                    raise ShardError(
                        f"shard {header.path!r} holds {header.dtype} rows of shape {header.shape[1:]}, the first "
                        f"shard {first.dtype} rows of shape {first.shape[1:]}: every shard must match",
                        path=header.path,
                    )
        self.dtype: np.dtype | None = headers[0].dtype if headers else None
        self.row_shape: tuple[int, ...] = headers[0].shape[1:] if headers else ()
        self._headers = [(h.offset, h.shape, h.fortran, h.stamp) for h in headers]
        self._starts = _shards.starts_of(h.shape[0] for h in headers)
        self._length = int(self._starts[-1])
        self._mapped = self._new_mapped()

    def _new_mapped(self) -> _shards.Opened[np.ndarray]:
        return _shards.Opened(MAPPED_SHARDS, self._map)

    def _map(self, shard: int) -> np.ndarray:
        path = self.paths[shard]
        offset, shape, fortran, recorded = self._headers[shard]
        _shards.check_stamp(path, recorded, _shards.stamp(path), "NpyShards")
        try:
            mapped = np.memmap(path, np.dtype(self.dtype), "r", offset, shape, "F" if fortran else "C")
        except (OSError, ValueError) as exc:
            raise ShardError(f"shard {path!r} cannot be mapped: {exc}", path=path) from exc
        return np.asarray(mapped)  # a plain array over the mapping: a row of it is not a memmap

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: Any) -> Any:
        shard, i = _shards.locate(self._starts, index, self._length)
        try:
            mapped = self._mapped.get(shard)
        except ShardError as exc:
            raise _shards.naming_sample(exc, i) from None
        return mapped[i - int(self._starts[shard])]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_mapped"]  # this process's mappings: the receiver maps its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._mapped = self._new_mapped()

    def __repr__(self) -> str:
        return f"NpyShards({len(self.paths)} shards, {self._length} rows of {self.row_shape} {self.dtype})"
