"""Turning a list of samples into a batch.

``collate_auto`` stacks numpy arrays, numpy scalars and Python numbers into one
array per field, recursing into tuples, namedtuples and dicts (the container type
is kept: ``core.structure.rebuilt``); anything else (strings, None, lists, objects) becomes a list. The arrays
of one field must agree in shape and dtype (a batch's dtype must not depend on
which samples it drew); when they do not, the error lists which positions of the
batch have which shape or dtype. ``torch.Tensor`` samples are stacked the same way
into one tensor, as ``torch.stack`` would (detached), in memory from ``alloc``
(``tensors``); ``jax.Array`` samples become numpy arrays.
``collate_list`` gives the seed generator's lists: a list of samples, or a tuple
of lists when samples are tuples such as ``(x, y)``.

Both take an ``alloc(shape, dtype)`` function for the stacked arrays, so that a
worker can stack straight into its shared-memory slot instead of copying later.
What a batch made in the calling process may share with the sources is ``aliasing``'s.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .structure import is_namedtuple, rebuilt
from .tensors import array_dtype, dtype_name, from_array, in_memory, is_jax_array, is_tensor

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
        return rebuilt(first, [collate_auto([s[i] for s in samples], alloc, f"{field}[{i}]") for i in range(width)])
    if isinstance(first, Mapping):
        fields = []
        for key in first:
            try:
                column = [s[key] for s in samples]
            except (KeyError, TypeError) as exc:
                raise ValueError(f"cannot collate{field}: a sample of the batch lacks key {key!r}") from exc
            fields.append(collate_auto(column, alloc, f"{field}[{key!r}]"))
        return rebuilt(first, fields)
    if is_tensor(first):
        return _stack_tensors(samples, alloc, field)
    if is_jax_array(first):  # numpy arrays: what jax.device_put takes, and what a slot can hold
        return _stack([np.asarray(s) if is_jax_array(s) else s for s in samples], alloc, field)
    return list(samples)


def _tensor_shape_of(sample: Any) -> str:
    return str(tuple(sample.shape)) if is_tensor(sample) else f"a {type(sample).__name__} (not a tensor)"


def _stack_tensors(samples: Sequence[Any], alloc: Alloc, field: str) -> Any:
    """``torch.stack(samples)``, detached, in an array from ``alloc`` that the tensor returned views;
    plain ``torch.stack`` for tensors an array cannot hold (``tensors``: quantized, on a GPU, ...).
    torch checks shapes and devices as it stacks; only a failure pays for ``_check_tensors``."""
    first = samples[0]
    kinds = {(type(sample), getattr(sample, "dtype", None)) for sample in samples}
    if len(kinds) > 1:
        _check_tensors(samples, field)  # raises, unless plain tensors and subclasses are mixed
    held_as = array_dtype(first.dtype) if len(kinds) == 1 and in_memory(first) else None
    torch = sys.modules["torch"]
    with torch.no_grad():  # samples that require grad are stacked as values
        try:
            if held_as is None:
                return torch.stack(list(samples))
            stacked = from_array(alloc((len(samples), *first.shape), held_as), dtype_name(first.dtype))
            torch.stack(list(samples), out=stacked)
            return stacked
        except RuntimeError:
            _check_tensors(samples, field)  # unequal shapes: say which
            raise


def _check_tensors(samples: Sequence[Any], field: str) -> None:
    """Raise ``ValueError`` naming the positions if ``samples`` are not tensors of one shape and dtype."""
    shape, dtype = samples[0].shape, samples[0].dtype
    if not all(is_tensor(sample) and sample.shape == shape for sample in samples):
        raise ValueError(
            f"cannot stack{field} into one tensor: the samples' shapes differ: "
            f"{_groups(samples, _tensor_shape_of)} ({_WHERE}); make the transform return equal shapes, "
            "or pass collate='list' or a collate function"
        )
    if not all(sample.dtype == dtype for sample in samples):
        raise ValueError(
            f"cannot stack{field} into one tensor: the samples' dtypes differ: "
            f"{_groups(samples, lambda s: str(s.dtype))} ({_WHERE}); make the transform return one dtype "
            f"(e.g. x.to({dtype})), or pass collate='list' or a collate function"
        )


def collate_list(samples: Sequence[Any], alloc: Alloc = private_alloc) -> Any:
    """The seed generator's batches: a list, or a tuple of lists for tuple samples."""
    first = samples[0]
    if isinstance(first, tuple) and not is_namedtuple(first):
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
