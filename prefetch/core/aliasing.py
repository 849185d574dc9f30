"""Batches made in the calling process (``workers=0``) must not share memory with the sources.

A worker's batch reaches the consumer through a slot, as a copy; in the calling process a batch
can alias the sources, so ``SourceMemory`` / ``BatchSafety`` copy exactly the parts that do (see
``SourceMemory``). Arrays are traced through their ``base`` chain; ``torch.Tensor`` has none, so a
tensor aliases a source when the memory under it overlaps memory a source or a loaded sample holds
(address ranges, ``_Spans``). See docs/design.md ("Decisions where the contract is silent").
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

import numpy as np

from .structure import ATOMIC_TYPES, children, is_container, map_structure
from .tensors import copy_tensor, is_tensor, storage_bounds

# A pathologically long ``base`` chain is cut here: what was seen is enough.
_MAX_CHAIN = 16


class SourceMemory:
    """What a batch made in the calling process (``workers=0``) may share with the sources.

    A worker's batch reaches the consumer through a slot, as a copy, so nothing the training
    loop does to it (``x *= 2``, ``batch[0].append(...)``) can reach the sources. In the calling
    process a batch can alias them: ``collate="list"`` keeps the samples themselves, a sample of a
    numpy source is a view of it, a transform may return its input. ``BatchSafety.detach`` copies
    exactly the parts of a batch that alias a source -- an array whose memory comes from a numpy
    source or from an array a sample held, a tensor whose memory overlaps a source's or a sample's
    (a tensor source, ``torch.from_numpy`` of a sample), a list or dict a sample held -- and nothing
    else, so ``workers=0`` gives the same stream as any number of workers whatever the loop does.
    Arrays the pipeline allocated itself (``BatchSafety.alloc``: stacking, ``np.take``), and the
    tensors that view them, are never copied.

    Other objects the samples hold (instances of user classes) are passed as they are.
    """

    def __init__(self, sources: tuple[Any, ...]):
        # the memory roots of plain numpy sources: every view of them leads to one of these
        self.roots: dict[int, Any] = {}
        for source in sources:
            if isinstance(source, np.ndarray) and not source.dtype.hasobject:
                _remember(self.roots, source)
            elif is_tensor(source):
                self.roots[id(source)] = source
        # whether a sample may hold objects of a source itself (anything but a plain numpy array's view)
        self.samples_may_alias = not all(
            isinstance(source, np.ndarray) and not source.dtype.hasobject for source in sources
        )

    def for_batch(self) -> BatchSafety:
        return BatchSafety(self)


def _remember(owned: dict[int, Any], array: Any) -> None:
    """Add ``array`` and the objects its memory comes from (its ``base``, and so on) to ``owned``."""
    obj, steps = array, 0
    while obj is not None and id(obj) not in owned and steps < _MAX_CHAIN:
        owned[id(obj)] = obj  # kept, so that the id cannot be reused while it is here
        obj = getattr(obj, "base", None)
        steps += 1


class BatchSafety:
    """One batch's part of ``SourceMemory``: ``alloc`` for the pipeline's own arrays, ``add`` for
    the loaded samples (before any transform), ``detach`` for the finished batch."""

    def __init__(self, memory: SourceMemory):
        self.owned = dict(memory.roots)  # id -> object
        self.samples_may_alias = memory.samples_may_alias
        self.fresh: dict[int, np.ndarray] = {}
        self.copies: dict[int, Any] = {}
        self.spans: _Spans | None = None  # what ``owned`` holds, as address ranges (for tensors)
        self.fresh_starts: set[int] | None = None  # where the ``fresh`` arrays start (for tensors)

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """``private_alloc``, remembering the array: it is the batch's own, never copied."""
        array = np.empty(shape, dtype)
        self.fresh[id(array)] = array
        self.fresh_starts = None
        return array

    def add(self, samples: Sequence[Any]) -> None:
        """Remember the arrays, tensors, lists and dicts the loaded ``samples`` hold (if a source may share them)."""
        if not self.samples_may_alias:
            return
        owned = self.owned
        self.spans = None
        pending = list(samples)
        while pending:
            value = pending.pop()
            kind = type(value)
            if kind in ATOMIC_TYPES:
                continue
            if is_container(value):
                if not isinstance(value, tuple):  # a list or dict: the batch must not share it (tuples cannot change)
                    owned[id(value)] = value
                pending.extend(children(value))
            elif isinstance(value, np.ndarray):
                _remember(owned, value)
                if value.dtype.hasobject:
                    pending.extend(value.flat)
            elif is_tensor(value):
                owned[id(value)] = value

    def _aliases(self, array: np.ndarray) -> bool:
        """Whether ``array``'s memory comes from a source (and not from the pipeline's own allocation)."""
        obj: Any = array
        for _ in range(_MAX_CHAIN):
            key = id(obj)
            if key in self.fresh:
                return False
            if key in self.owned:
                return True
            base = getattr(obj, "base", None)
            if base is None:  # the end of the chain; ``tensor.numpy()``'s base is the tensor
                return not isinstance(obj, np.ndarray) and is_tensor(obj) and self._tensor_aliases(obj)
            obj = base
        return False

    def _tensor_aliases(self, tensor: Any) -> bool:
        """Whether the memory under ``tensor`` overlaps memory a source or a loaded sample holds."""
        bounds = storage_bounds(tensor)
        if bounds is None:
            return True  # nothing to look at: copying is what a worker's slot would do
        if self.fresh_starts is None:
            self.fresh_starts = {array.__array_interface__["data"][0] for array in self.fresh.values()}
        if bounds[0] in self.fresh_starts:  # a stacked batch: no need to look further
            return False
        if self.spans is None:
            self.spans = _Spans(self.owned.values())
        return self.spans.overlaps(*bounds)

    def detach(self, value: Any) -> Any:
        """``value`` with every part that aliases a source replaced by a copy: a list or dict a sample held
        is a new one, and so is any container around a copy (``core.structure.map_structure``)."""
        return map_structure(self._detach_leaf, value, renew=self._held, memo=self.copies)

    def _held(self, container: Any) -> bool:
        return id(container) in self.owned

    def _detach_leaf(self, value: Any) -> Any:
        if type(value) in ATOMIC_TYPES:
            return value
        if isinstance(value, np.ndarray):
            if not value.dtype.hasobject:
                return value.copy(order="K") if self._aliases(value) else value
            items = [self.detach(item) for item in value.flat]  # its items may alias the sources too
            if self._aliases(value) or any(a is not b for a, b in zip(items, value.flat)):
                result = np.empty(value.shape, value.dtype)
                flat = result.reshape(-1)
                for position, item in enumerate(items):
                    flat[position] = item
                return result
            return value
        if is_tensor(value) and self._tensor_aliases(value):
            return copy_tensor(value)
        return value


class _Spans:
    """The address ranges of the memory some arrays and tensors hold: does a range overlap any?"""

    def __init__(self, holders: Any):
        spans = sorted(span for span in map(_bounds, holders) if span is not None)
        self.starts = [start for start, _ in spans]
        self.reach = list(itertools.accumulate((end for _, end in spans), max))  # the furthest end so far

    def overlaps(self, start: int, end: int) -> bool:
        before = bisect_left(self.starts, end)  # the spans that start before ``end``
        return start < end and before > 0 and self.reach[before - 1] > start


def _bounds(holder: Any) -> tuple[int, int] | None:
    """``(first, past the last)`` address of the bytes an array or a tensor holds; None for other
    objects and for empty ones."""
    if isinstance(holder, np.ndarray):
        if holder.dtype.hasobject or holder.size == 0:
            return None
        low = high = holder.__array_interface__["data"][0]
        for length, stride in zip(holder.shape, holder.strides):
            if stride < 0:
                low += (length - 1) * stride
            else:
                high += (length - 1) * stride
        return low, high + holder.itemsize
    if is_tensor(holder):
        bounds = storage_bounds(holder)
        return bounds if bounds is not None and bounds[0] < bounds[1] else None
    return None
