"""Turning a list of samples into a batch.

``collate_auto`` stacks numpy arrays, numpy scalars and Python numbers into one
array per field, recursing into tuples, namedtuples and dicts (the container type
is kept); anything else (strings, None, lists, objects) becomes a list. The arrays
of one field must agree in shape and dtype (a batch's dtype must not depend on
which samples it drew); when they do not, the error lists which positions of the
batch have which shape or dtype.
``collate_list`` gives the seed generator's lists: a list of samples, or a tuple
of lists when samples are tuples such as ``(x, y)``.

Both take an ``alloc(shape, dtype)`` function for the stacked arrays, so that a
worker can stack straight into its shared-memory slot instead of copying later.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Alloc = Callable[[tuple[int, ...], np.dtype], np.ndarray]


def private_alloc(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An ordinary array in this process's memory."""
    return np.empty(shape, dtype)


def _is_stackable(value: Any) -> bool:
    if isinstance(value, (np.ndarray, np.generic)):
        return not isinstance(value, (np.str_, np.bytes_)) or isinstance(value, np.ndarray)
    return isinstance(value, numbers.Number) and not isinstance(value, (str, bytes))


# How many positions an error message lists per group before it abbreviates.
_POSITIONS_SHOWN = 8


def _groups(samples: Sequence[Any], describe: Callable[[Any], str]) -> str:
    """'(3,) at positions [0, 1, 2]; (4,) at position [3]': which samples of a batch have what."""
    where: dict[str, list[int]] = {}
    for position, sample in enumerate(samples):
        where.setdefault(describe(sample), []).append(position)
    parts = []
    for what, positions in where.items():
        shown = ", ".join(map(str, positions[:_POSITIONS_SHOWN]))
        more = f", ... ({len(positions)} in all)" if len(positions) > _POSITIONS_SHOWN else ""
        parts.append(f"{what} at position{'s' if len(positions) > 1 else ''} [{shown}{more}]")
    return "; ".join(parts)


# Positions count from 0 in the batch; the note prefetch adds to the error lists the batch's
# sample indices in the same order, so position p is the p-th index there.
_WHERE = "positions in the batch; the note below lists the batch's sample indices in the same order"


def _shape_of(sample: Any) -> str:
    return str(sample.shape) if isinstance(sample, np.ndarray) else f"a {type(sample).__name__} (not an array)"


def _stack_numbers(samples: Sequence[Any], alloc: Alloc, field: str) -> np.ndarray:
    """Python numbers and numpy scalars: one small array (mixed ints and floats promote, as in numpy)."""
    try:
        values = np.asarray(samples)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"cannot stack{field} into one array: the samples are {_groups(samples, _kind_of)} ({_WHERE}); "
            "make every sample of this field the same kind, or pass collate='list' or a collate function"
        ) from exc
    if values.dtype.kind in "USV":  # a string among numbers would silently turn every number into text
        raise ValueError(
            f"cannot stack{field} into one array: numbers and text are mixed: {_groups(samples, _kind_of)} "
            f"({_WHERE}); make every sample of this field a number, or pass collate='list'"
        )
    if values.dtype.hasobject or values.ndim != 1:
        return values
    out = alloc(values.shape, values.dtype)
    out[...] = values
    return out


def _kind_of(sample: Any) -> str:
    return type(sample).__name__


def _stack(samples: Sequence[Any], alloc: Alloc, field: str) -> np.ndarray:
    first = samples[0]
    if not isinstance(first, np.ndarray):
        return _stack_numbers(samples, alloc, field)
    shape = first.shape
    dtype = first.dtype
    # Small samples: one bulk assignment (numpy rejects unequal shapes itself); only a mismatch
    # pays for the sample-by-sample check below, which says what differs.
    small = first.nbytes < STREAM_MIN_SAMPLE_BYTES and not dtype.hasobject
    if small and all(type(sample) is np.ndarray and sample.dtype == dtype for sample in samples):
        out = alloc((len(samples), *shape), dtype)
        try:
            out[...] = samples
            return out
        except ValueError:
            pass
    for sample in samples:
        if not isinstance(sample, np.ndarray) or sample.shape != shape:
            raise ValueError(
                f"cannot stack{field} into one array: the samples' shapes differ: {_groups(samples, _shape_of)} "
                f"({_WHERE}); make the transform return equal shapes, or pass collate='list' or a collate function"
            )
        if sample.dtype != dtype:
            raise ValueError(
                f"cannot stack{field} into one array: the samples' dtypes differ: "
                f"{_groups(samples, lambda s: str(s.dtype))} ({_WHERE}); make the transform return one dtype "
                f"(e.g. x.astype({str(dtype)!r})), or pass collate='list' or a collate function"
            )
    if dtype.hasobject:
        return np.stack(samples)
    out = alloc((len(samples), *shape), dtype)
    for position, sample in enumerate(samples):  # faster than np.stack, small arrays or large
        out[position] = sample
    return out


def collate_auto(samples: Sequence[Any], alloc: Alloc = private_alloc, field: str = "") -> Any:
    """Collate ``samples`` field by field (see the module docstring)."""
    first = samples[0]
    if _is_stackable(first):
        return _stack(samples, alloc, field)
    if isinstance(first, tuple):
        width = len(first)
        for position, sample in enumerate(samples):
            if not isinstance(sample, tuple) or len(sample) != width:
                raise ValueError(
                    f"cannot collate{field}: the sample at position {position} of the batch is a "
                    f"{type(sample).__name__} of length {len(sample) if hasattr(sample, '__len__') else '?'}, the one "
                    f"at position 0 a tuple of {width} ({_WHERE})"
                )
        fields = [collate_auto([s[i] for s in samples], alloc, f"{field}[{i}]") for i in range(width)]
        if hasattr(first, "_fields"):  # namedtuple
            return type(first)(*fields)
        return tuple(fields)
    if isinstance(first, Mapping):
        out = {}
        for key in first:
            try:
                column = [s[key] for s in samples]
            except (KeyError, TypeError) as exc:
                raise ValueError(f"cannot collate{field}: a sample of the batch lacks key {key!r}") from exc
            out[key] = collate_auto(column, alloc, f"{field}[{key!r}]")
        return out if type(first) is dict else _rebuild_mapping(first, out)
    return list(samples)


def _rebuild_mapping(example: Mapping[Any, Any], fields: dict[Any, Any]) -> Any:
    try:
        return type(example)(fields)  # type: ignore[call-arg]
    except Exception:
        return fields


def collate_list(samples: Sequence[Any], alloc: Alloc = private_alloc) -> Any:
    """The seed generator's batches: a list, or a tuple of lists for tuple samples."""
    first = samples[0]
    if isinstance(first, tuple) and not hasattr(first, "_fields"):
        return tuple([s[i] for s in samples] for i in range(len(first)))
    return list(samples)


# Samples smaller than this stay in cache anyway: they are stacked all at once, after the transforms.
STREAM_MIN_SAMPLE_BYTES = 64 * 1024


class StreamingStack:
    """``collate_auto`` done one sample at a time, for samples that are an array or a plain tuple
    of arrays and numbers: each transformed sample is copied into the batch while it is still in
    the CPU's cache, instead of after the whole batch is transformed (for large images that saves
    a round trip through memory per sample). ``push`` refuses a sample that does not match the
    first; the caller then falls back to ``collate_auto`` over ``rows_as_samples()`` and the rest,
    so the result -- or the error -- is exactly ``collate_auto``'s.
    """

    def __init__(self, first: Any, count: int, alloc: Alloc):
        self.is_tuple = type(first) is tuple
        leaves = first if self.is_tuple else (first,)
        self.outs: list[np.ndarray | list[Any]] = [
            alloc((count, *leaf.shape), leaf.dtype) if type(leaf) is np.ndarray else [] for leaf in leaves
        ]
        self.alloc = alloc
        self.rows = 0

    @staticmethod
    def accepts(first: Any) -> bool:
        """Whether a batch whose first sample is ``first`` can be stacked as it goes."""
        leaves = first if type(first) is tuple else (first,)
        if type(first) is not tuple and type(first) is not np.ndarray:
            return False
        arrays = [leaf for leaf in leaves if type(leaf) is np.ndarray]
        if sum(leaf.nbytes for leaf in arrays) < STREAM_MIN_SAMPLE_BYTES:
            return False  # small samples: stacking the whole batch at once is cheaper
        return all((type(leaf) is np.ndarray and not leaf.dtype.hasobject) or _is_number(leaf) for leaf in leaves)

    def push(self, sample: Any) -> bool:
        """Write ``sample`` as the next row; False, writing nothing, if it does not match the first."""
        if self.is_tuple:
            if type(sample) is not tuple or len(sample) != len(self.outs):
                return False
            leaves = sample
        else:
            leaves = (sample,)
        for leaf, out in zip(leaves, self.outs, strict=True):
            if isinstance(out, list):
                if not _is_number(leaf):
                    return False
            elif type(leaf) is not np.ndarray or leaf.shape != out.shape[1:] or leaf.dtype != out.dtype:
                return False
        for leaf, out in zip(leaves, self.outs, strict=True):
            if isinstance(out, list):
                out.append(leaf)
            else:
                out[self.rows] = leaf
        self.rows += 1
        return True

    def _row(self, i: int) -> Any:
        leaves = tuple(out[i] for out in self.outs)
        return leaves if self.is_tuple else leaves[0]

    def rows_as_samples(self) -> list[Any]:
        """The samples pushed so far (array leaves as views of their row)."""
        return [self._row(i) for i in range(self.rows)]

    def result(self) -> Any:
        parts = [collate_auto(out, self.alloc) if isinstance(out, list) else out for out in self.outs]
        return tuple(parts) if self.is_tuple else parts[0]


def _is_number(value: Any) -> bool:
    return _is_stackable(value) and not isinstance(value, np.ndarray)


# --- batches made in the calling process must not share memory with the sources -----------------

# Leaves that cannot alias anything mutable: skipped at once by ``SourceMemory``'s walks.
_ATOMIC_TYPES = frozenset({int, float, complex, bool, str, bytes, type(None)})
# A pathologically long ``base`` chain is cut here: what was seen is enough.
_MAX_CHAIN = 16


class SourceMemory:
    """What a batch made in the calling process (``workers=0``) may share with the sources.

    A worker's batch reaches the consumer through a slot, as a copy, so nothing the training
    loop does to it (``x *= 2``, ``batch[0].append(...)``) can reach the sources. In the calling
    process a batch can alias them: ``collate="list"`` keeps the samples themselves, a sample of a
    numpy source is a view of it, a transform may return its input. ``BatchSafety.detach`` copies
    exactly the parts of a batch that alias a source -- an array whose memory comes from a numpy
    source or from an array a sample held, a list or dict a sample held -- and nothing else, so
    ``workers=0`` gives the same stream as any number of workers whatever the loop does. Arrays
    the pipeline allocated itself (``BatchSafety.alloc``: stacking, ``np.take``) are never copied.

    Other objects the samples hold (instances of user classes) are passed as they are.
    """

    def __init__(self, sources: tuple[Any, ...]):
        # the memory roots of plain numpy sources: every view of them leads to one of these
        self.roots: dict[int, Any] = {}
        for source in sources:
            if isinstance(source, np.ndarray) and not source.dtype.hasobject:
                _remember(self.roots, source)
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

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """``private_alloc``, remembering the array: it is the batch's own, never copied."""
        array = np.empty(shape, dtype)
        self.fresh[id(array)] = array
        return array

    def add(self, samples: Sequence[Any]) -> None:
        """Remember the arrays, lists and dicts the loaded ``samples`` hold (if a source may share them)."""
        if not self.samples_may_alias:
            return
        owned = self.owned
        pending = list(samples)
        while pending:
            value = pending.pop()
            kind = type(value)
            if kind in _ATOMIC_TYPES:
                continue
            if kind is tuple:
                pending.extend(value)
            elif isinstance(value, np.ndarray):
                _remember(owned, value)
                if value.dtype.hasobject:
                    pending.extend(value.flat)
            elif isinstance(value, (list, dict)):
                owned[id(value)] = value
                pending.extend(value.values() if isinstance(value, dict) else value)
            elif isinstance(value, tuple):
                pending.extend(value)

    def _aliases(self, array: np.ndarray) -> bool:
        """Whether ``array``'s memory comes from a source (and not from the pipeline's own allocation)."""
        obj: Any = array
        steps = 0
        while obj is not None and steps < _MAX_CHAIN:
            key = id(obj)
            if key in self.fresh:
                return False
            if key in self.owned:
                return True
            obj = getattr(obj, "base", None)
            steps += 1
        return False

    def detach(self, value: Any) -> Any:
        """``value`` with every part that aliases a source replaced by a copy."""
        kind = type(value)
        if kind in _ATOMIC_TYPES:
            return value
        if kind is np.ndarray and not value.dtype.hasobject and not self._aliases(value):
            return value
        key = id(value)
        if key in self.copies:  # one object twice in a batch stays one object, as pickle keeps it
            return self.copies[key]
        result = value
        if isinstance(value, np.ndarray):
            owned = self._aliases(value)
            if value.dtype.hasobject:  # its items may alias the sources too
                items = [self.detach(item) for item in value.flat]
                if owned or any(a is not b for a, b in zip(items, value.flat)):
                    result = np.empty(value.shape, value.dtype)
                    flat = result.reshape(-1)
                    for position, item in enumerate(items):
                        flat[position] = item
            elif owned:
                result = value.copy(order="K")
        elif isinstance(value, list):
            items = [self.detach(item) for item in value]
            if id(value) in self.owned or any(a is not b for a, b in zip(items, value)):
                result = _rebuilt(value, items)
        elif isinstance(value, dict):
            fields = {k: self.detach(v) for k, v in value.items()}
            if id(value) in self.owned or any(fields[k] is not v for k, v in value.items()):
                result = _rebuilt(value, fields)
        elif isinstance(value, tuple):
            items = [self.detach(item) for item in value]
            if any(a is not b for a, b in zip(items, value)):
                result = _rebuilt(value, items)
        self.copies[key] = result
        return result


def _rebuilt(container: Any, items: Any) -> Any:
    """A new container of ``container``'s type holding ``items`` (a plain one if the type resists)."""
    kind = type(container)
    try:
        if isinstance(container, tuple) and hasattr(container, "_fields"):
            return kind(*items)
        return kind(items)
    except Exception:
        return tuple(items) if isinstance(container, tuple) else items
