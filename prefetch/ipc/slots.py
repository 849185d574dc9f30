"""Slots: where a value of arrays is written by the process that makes it and read, without a copy, by another.

A *slot* is a numbered place for one value (a batch of the loader, an item of ``background``); its
bytes live in a segment (``segments``) that the writer and the reader both map. Who owns a slot when
is the caller's protocol; this module only writes and reads. Invariants (``docs/design.md``,
"Shared memory: slots and leases"):

* the writer puts the value's arrays into the slot (``SlotWriter``) -- stacking straight into it
  where it can (``SlotSpace.alloc``) -- and creates a larger segment when the value does not fit
  (the old one is unlinked; segment names are never reused);
* how the value sits in its slot travels as a ``SlotLayout``: a value made only of arrays placed in
  the slot is described directly (``SlotArrays``), anything else is pickled with protocol 5, its
  array buffers out of band in the slot; a payload above ``INLINE_PAYLOAD_MAX_BYTES`` goes in the
  slot too, so a layout never needs more than one atomic pipe write;
* the reader maps the segment and builds arrays that *view* the slot (``SlotReader``), all based on
  one *lease* array per value, or copies them out;
* a plain ``torch.Tensor`` travels as the array that views it (``core.tensors``) and is rebuilt over
  the slot, holding the lease as an array would.
"""

from __future__ import annotations

import io
import math
import mmap
import os
import pickle
from itertools import count
from typing import Any, NamedTuple

import numpy as np

from ..core.structure import flatten, unflatten
from ..core.tensors import as_array, from_array, tensor_type
from .segments import PAGE_BYTES, SegmentRef, align, buffer_address, create_segment, open_segment, unlink_segment

# Arrays in a slot start at multiples of this, so SIMD loads and stores stay aligned.
ALIGN_BYTES = 64
# A pickled payload larger than this goes into the slot too, so that its message stays within one
# atomic pipe write (PIPE_BUF, 4096 bytes on Linux) and is never spilled to a file of its own
# (``channel.atomic_body``): a message is about 250 bytes besides the payload, which leaves room for
# a layout listing ~100 out-of-band buffers. Below it, the payload rides in the message (no slot
# needed); above it, one copy into the slot, whose segment is reused.
INLINE_PAYLOAD_MAX_BYTES = 2 * 1024
# What a slot holds, and the fix when /dev/shm cannot hold one: a writer's callers say it in their words.
SLOT_PURPOSE = ("a value", "free space there, or hold fewer values in shared memory at once (Docker: --shm-size)")


class SlotArrays(NamedTuple):
    """A value that is nothing but arrays placed in its slot -- one array, a tuple or a dict of them
    (``core.structure.flatten``), the usual batch -- described without pickle, which costs more than
    the rest of a small value's trip. ``arrays`` gives each array's ``(offset, dtype.str, shape)``;
    ``tensors`` lists ``(position, torch dtype name)`` for the leaves that are ``torch.Tensor``s
    viewing their array (``core.tensors.from_array``)."""

    container: str  # "array", "tuple" or "dict"
    keys: tuple[str, ...]  # the dict's keys, in order; () otherwise
    arrays: tuple[tuple[int, str, tuple[int, ...]], ...]
    tensors: tuple[tuple[int, str], ...] = ()


class SlotLayout(NamedTuple):
    """Where a value sits in its slot: the one record of its layout, from the writer to the reader.

    Either ``arrays`` describes it (``SlotArrays``), or ``payload`` is the value pickled with
    protocol 5, its array buffers out of band, and ``buffers`` gives each buffer's
    ``(offset, nbytes)`` in ``segment``. A large payload is itself stored in the segment: then
    ``payload`` is None and the last entry of ``buffers`` locates it. ``segment`` is None when
    nothing was written to the slot (no arrays, small payload).
    """

    segment: SegmentRef | None
    payload: bytes | None
    buffers: tuple[tuple[int, int], ...]
    arrays: SlotArrays | None = None


# --- the writer's side ----------------------------------------------------------------------


class _Mapping:
    """The writer's mapping of a slot's segment."""

    def __init__(self, ref: SegmentRef, mm: mmap.mmap):
        self.ref = ref
        self.mm = mm
        self.view = np.frombuffer(mm, np.uint8)
        self.base = int(self.view.ctypes.data)

    def close(self) -> None:
        del self.view
        try:
            self.mm.close()
        except BufferError:  # an array of a value still views it: unmapped when that array goes
            pass


class SlotSpace:
    """The free space of one slot while a value is written: a bump allocator that
    remembers where each array it handed out lies."""

    def __init__(self, mapping: _Mapping | None):
        self.mapping = mapping
        self.used = 0
        self._placed: dict[int, tuple[np.ndarray, int]] = {}  # id -> (array, offset)
        self._by_address: dict[int, np.ndarray] | None = None  # the placed arrays by address, for tensors

    def reserve(self, nbytes: int) -> int | None:
        """Offset of ``nbytes`` fresh bytes in the slot, or None when they do not fit."""
        if self.mapping is None:
            return None
        offset = align(self.used, ALIGN_BYTES)
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
        if leaf.dtype.kind == "V" or leaf.dtype.subdtype is not None:  # dtype.str would lose fields, or JAX's bfloat16
            return None
        return entry[1], leaf.dtype.str, leaf.shape

    def _array_under(self, tensor: Any) -> tuple[np.ndarray, str] | None:
        """The array ``alloc`` placed that ``tensor`` views whole (``tensors.from_array`` of it), if any,
        and the tensor's dtype name (None for anything but a plain tensor)."""
        viewed = as_array(tensor)
        if viewed is None or self.mapping is None:
            return None
        view, name = viewed
        if self._by_address is None:
            base = self.mapping.base
            self._by_address = {base + offset: array for array, offset in self._placed.values()}
        array = self._by_address.get(tensor.data_ptr())
        if array is None or view.shape != array.shape or view.dtype != array.dtype or not view.flags.c_contiguous:
            return None
        return array, name

    def describe(self, value: Any) -> SlotArrays | None:
        """``value`` as ``SlotArrays`` if it is one array, a tuple or a str-keyed dict of arrays
        (``core.structure.flatten``) that ``alloc`` placed in the slot, or of tensors viewing them;
        None otherwise."""
        flat = flatten(value)
        if flat is None:
            return None
        kind, keys, leaves = flat
        arrays, tensors = [], []
        for position, leaf in enumerate(leaves):
            where = self._where(leaf)
            if where is None:  # not an array alloc placed: perhaps a tensor viewing one
                under = self._array_under(leaf)
                if under is None:
                    return None
                where = self._where(under[0])
                if where is None:
                    return None
                tensors.append((position, under[1]))
            arrays.append(where)
        return SlotArrays("array" if kind == "leaf" else kind, keys, tuple(arrays), tuple(tensors))


class _OutOfBandPickler(pickle.Pickler):
    """Pickles a value with its arrays out of band. Non-contiguous arrays are first made contiguous in the
    slot, and so are read-only ones (a view of read-only shared memory): pickle would otherwise carry
    the read-only flag to the reader, whose arrays must be writable. A plain
    tensor is pickled as its numpy view, so its bytes go out of band too."""

    def __init__(self, file: io.BytesIO, space: SlotSpace, buffers: list[pickle.PickleBuffer]):
        super().__init__(file, protocol=5, buffer_callback=buffers.append)
        self._space = space
        self._tensor = tensor_type()

    def reducer_override(self, obj: Any) -> Any:
        if self._tensor is not None and type(obj) is self._tensor:
            viewed = as_array(obj)
            return NotImplemented if viewed is None else (from_array, viewed)
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
    """A process's writer into slots; keeps each slot's segment mapped between values.

    ``purpose`` is ``(what a slot holds, the fix)`` for the error when ``/dev/shm`` cannot hold one."""

    def __init__(self, prefix: str, purpose: tuple[str, str] = SLOT_PURPOSE):
        self._prefix = prefix
        self._purpose = purpose
        self._maps: dict[int, _Mapping] = {}
        self._names = count()

    def space(self, slot: int, segment: SegmentRef | None, size_hint: int) -> SlotSpace:
        """The space to build a value in, in ``slot`` whose segment is ``segment`` (None: none yet; then one of
        ``size_hint`` bytes is made if that is > 0)."""
        mapping = self._maps.get(slot)
        if segment is None:
            if mapping is None and size_hint > 0:
                mapping = self._create(slot, size_hint, old=None)
        elif mapping is None or mapping.ref != segment:
            try:
                mapping = _Mapping(segment, open_segment(segment))
            except FileNotFoundError:  # replaced by a value whose report was lost: start afresh
                mapping = self._create(slot, max(size_hint, segment.size), old=None)
            self._maps[slot] = mapping
        return SlotSpace(mapping)

    def close(self) -> None:
        """Unmap every slot this writer keeps mapped (the segments themselves stay)."""
        maps, self._maps = self._maps, {}
        for mapping in maps.values():
            mapping.close()

    def _create(self, slot: int, size: int, old: _Mapping | None) -> _Mapping:
        name = f"{self._prefix}{slot}-{os.getpid()}-{next(self._names)}"
        size = max(align(size, PAGE_BYTES), PAGE_BYTES)  # at least a page: 0-byte arrays still have a slot
        ref = SegmentRef(name, size)
        mapping = _Mapping(ref, create_segment(name, size, self._purpose))
        if old is not None:
            unlink_segment(old.ref.name)
        self._maps[slot] = mapping
        return mapping

    def write(self, slot: int, space: SlotSpace, value: Any) -> SlotLayout:
        """Put ``value`` in the slot: arrays out of band (growing the slot if needed), the rest pickled."""
        arrays = space.describe(value)
        if arrays is not None:  # already in the slot: nothing to write
            assert space.mapping is not None
            return SlotLayout(space.mapping.ref, None, (), arrays)
        buffers: list[pickle.PickleBuffer] = []
        file = io.BytesIO()
        _OutOfBandPickler(file, space, buffers).dump(value)
        payload = file.getvalue()
        raws = [buffer.raw() for buffer in buffers]
        if len(payload) > INLINE_PAYLOAD_MAX_BYTES:
            raws.append(memoryview(payload))
        if not raws:
            return SlotLayout(None, payload, ())
        placed: list[tuple[int, int]] = []
        for raw in raws:
            nbytes = raw.nbytes
            if nbytes and space.holds(buffer_address(raw), nbytes):
                assert space.mapping is not None
                placed.append((buffer_address(raw) - space.mapping.base, nbytes))
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

    def _write_grown(self, slot: int, space: SlotSpace, payload: bytes, raws: list[memoryview]) -> SlotLayout:
        needed = sum(align(raw.nbytes, ALIGN_BYTES) for raw in raws)
        old = space.mapping
        size = needed if old is None else max(needed, old.ref.size + old.ref.size // 4)
        mapping = self._create(slot, size, old=old)
        placed, offset = [], 0
        for raw in raws:
            nbytes = raw.nbytes
            mapping.view[offset : offset + nbytes] = np.frombuffer(raw, np.uint8)
            placed.append((offset, nbytes))
            offset = align(offset + nbytes, ALIGN_BYTES)
        inline = None if len(payload) > INLINE_PAYLOAD_MAX_BYTES else payload
        return SlotLayout(mapping.ref, inline, tuple(placed))


# --- the reader's side ----------------------------------------------------------------------


class SlotReader:
    """A process's reader of slots; keeps each slot's segment mapped until ``close``.

    A mapping is shared by the reader (its cache) and by the arrays of every value read from it
    (their numpy base is the ``mmap``), so it is unmapped, and its descriptor closed, when both
    have let go: ``close`` drops the cache and unmaps at once what no value uses; a mapping a
    value the user holds still uses goes when the user drops the last array of that value.
    """

    def __init__(self) -> None:
        self._maps: dict[int, tuple[SegmentRef, mmap.mmap]] = {}

    def close(self) -> None:
        """Let go of every mapping (see the class docstring); the reader may still be used afterwards."""
        maps, self._maps = self._maps, {}
        for _, mm in maps.values():
            try:
                mm.close()
            except BufferError:  # a value the user holds views it: unmapped when that value is dropped
                pass

    def read(self, slot: int, layout: SlotLayout, lease: bool) -> tuple[Any, np.ndarray | None]:
        """Rebuild a value. With ``lease`` its arrays view the slot, and the returned lease
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
                except BufferError:  # still viewed by a held value, unmapped when that goes
                    pass
            cached = (segment, open_segment(segment))
            self._maps[slot] = cached
        if arrays is not None:
            whole = np.frombuffer(cached[1], np.uint8)
            leaves = [np.ndarray(shape, dtype, buffer=whole, offset=offset) for offset, dtype, shape in arrays.arrays]
            if not lease:
                leaves = [leaf.copy() for leaf in leaves]
            for position, name in arrays.tensors:
                leaves[position] = from_array(leaves[position], name)
            kind = "leaf" if arrays.container == "array" else arrays.container
            return unflatten(kind, arrays.keys, leaves), (whole if lease else None)
        end = max(offset + nbytes for offset, nbytes in buffers)
        whole = np.frombuffer(cached[1], np.uint8, count=max(end, 1))
        views = [whole[offset : offset + nbytes] for offset, nbytes in buffers]
        data: Any = payload if payload is not None else views.pop()
        if not lease:
            views = [view.copy() for view in views]
        return pickle.loads(data, buffers=views), (whole if lease else None)
