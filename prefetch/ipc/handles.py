"""Arrays that travel as small handles instead of their bytes, and are opened again where they arrive.

* ``MemmapFile``: a ``np.memmap`` that is a region of its file (any shape and non-negative strides),
  reopened read-only from the file by path -- in a spawned process, or on another node, where the
  same path must exist. Both executors reopen memmaps through it.
* ``SharedArray``: an array copied once into a segment (``segments``), mapped read-only by the
  process that opens it, which unlinks the name at once: the memory then lives as long as the
  mappings do, never longer than the processes that use it.

Either way the array opened is read-only and views memory that is never copied per process.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np

from .segments import PAGE_BYTES, SegmentRef, align, buffer_address, create_segment, open_segment, unlink_segment


@dataclass(frozen=True)
class MemmapFile:
    """A region of a file, as a ``np.memmap`` source maps it: reopened read-only by ``open``."""

    filename: str
    offset: int  # of the array's first byte in the file
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: np.dtype  # the dtype itself: its str form loses a structured dtype's fields

    @classmethod
    def of(cls, source: np.memmap) -> MemmapFile | None:
        """The handle of ``source``, or None when it cannot be reopened from a file (no file behind it,
        a negative stride): then it travels as its data."""
        mapped = getattr(source, "_mmap", None)
        if mapped is None or source.filename is None or any(s < 0 for s in source.strides):
            return None
        # numpy maps from an allocation-granularity boundary at or before the memmap's offset
        start = source.offset - source.offset % mmap.ALLOCATIONGRANULARITY
        offset = start + int(source.ctypes.data) - buffer_address(mapped)
        return cls(str(source.filename), offset, tuple(source.shape), tuple(source.strides), source.dtype)

    def open(self) -> np.ndarray:
        """The array, read-only, viewing the file (mapped whole: address space, not memory)."""
        whole = np.memmap(self.filename, dtype=np.uint8, mode="r")
        return np.ndarray(self.shape, np.dtype(self.dtype), buffer=whole, offset=self.offset, strides=self.strides)


@dataclass(frozen=True)
class SharedArray:
    """An array copied once into segment ``name`` of ``size`` bytes: opened read-only by ``open``."""

    name: str
    size: int
    shape: tuple[int, ...]
    dtype: np.dtype  # the dtype itself: its str form loses a structured dtype's fields

    @classmethod
    def copy_of(cls, array: np.ndarray, name: str, purpose: tuple[str, str]) -> SharedArray:
        """Copy ``array`` into a new segment ``name``; ``purpose`` words the error when ``/dev/shm`` cannot
        hold it (``segments.create_segment``: an ``OSError`` naming what and the fix)."""
        size = align(max(array.nbytes, 1), PAGE_BYTES)
        mm = create_segment(name, size, purpose)
        target = np.frombuffer(mm, np.uint8, count=array.nbytes).view(array.dtype).reshape(array.shape)
        np.copyto(target, array)
        del target
        mm.close()
        return cls(name, size, tuple(array.shape), array.dtype)

    def open(self) -> np.ndarray:
        """The array, read-only, over this process's mapping; the segment's name is unlinked at once (the
        mapping, and those of processes forked from this one, keep the memory)."""
        mm = open_segment(SegmentRef(self.name, self.size))
        unlink_segment(self.name)
        count = int(np.prod(self.shape, dtype=np.int64))
        array = np.frombuffer(mm, np.dtype(self.dtype), count=count).reshape(self.shape)
        array.flags.writeable = False
        return array
