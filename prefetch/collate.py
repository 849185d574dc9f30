"""Turning a list of samples into a batch.

``collate_auto`` stacks numpy arrays, numpy scalars and Python numbers into one
array per field, recursing into tuples, namedtuples and dicts (the container type
is kept); anything else (strings, None, lists, objects) becomes a list.
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


def _stack(samples: Sequence[Any], alloc: Alloc, field: str) -> np.ndarray:
    first = samples[0]
    if not isinstance(first, np.ndarray):
        values = np.asarray(samples)  # Python numbers and numpy scalars: one small array
        if values.dtype.hasobject or values.ndim != 1:
            return values
        out = alloc(values.shape, values.dtype)
        out[...] = values
        return out
    shape = first.shape
    dtype = first.dtype
    for position, sample in enumerate(samples):
        if not isinstance(sample, np.ndarray) or sample.shape != shape:
            got = getattr(sample, "shape", type(sample).__name__)
            raise ValueError(
                f"cannot stack{field} into one array: sample {position} of the batch has shape {got}, "
                f"sample 0 has {shape}; make the transform return equal shapes, or pass collate='list' "
                "or a collate function"
            )
        if sample.dtype != dtype:
            dtype = np.result_type(dtype, sample.dtype)
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
                    f"cannot collate{field}: sample {position} of the batch is {type(sample).__name__} of "
                    f"length {len(sample) if hasattr(sample, '__len__') else '?'}, sample 0 a tuple of {width}"
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
