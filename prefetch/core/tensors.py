"""``torch.Tensor`` and ``jax.Array`` leaves, recognised without importing torch or JAX.

A sample can only hold a tensor if the user's code imported torch already, so this module asks
``sys.modules`` instead of importing anything: without torch or JAX, a check costs a dict lookup.

A *plain* tensor is an exact ``torch.Tensor`` on the CPU, strided, outside autograd, without a lazy
conjugate or negative bit, of a dtype an array can hold: numpy's own, or -- for a floating dtype
numpy lacks (bfloat16, float8, complex32) -- integers of the same size holding its bits. Such a
tensor travels as an array (``as_array``: a view, no copy) -- through a slot, out of band in a
pickle, through Ray's object store -- and is rebuilt with ``from_array``, a tensor that views the
array and keeps it alive (what lets a slot's lease outlive the user's tensor, and no longer).
Anything else (quantized, on a GPU, a subclass) travels as torch pickles it.
See docs/design.md ("Tensors").
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import numpy as np

# The torch dtypes numpy also has, by their common name (torch.uint16 and wider exist from torch 2.3).
_SHARED_DTYPE_NAMES = frozenset(
    {
        "bool",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    }
)
# A floating dtype numpy lacks (bfloat16, float8, complex32) is held as its bits, in integers of its
# size (signed from 2 bytes on: numpy's uint16 and wider reach torch only from 2.3).
_BITS_DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int16),
    4: np.dtype(np.int32),
    8: np.dtype(np.int64),
}
_array_dtypes: dict[Any, np.dtype | None] = {}  # torch dtype -> array dtype, filled as they come


def tensor_type() -> type | None:
    """``torch.Tensor`` if torch is imported (None otherwise, or for a stand-in module without it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    tensor = getattr(torch, "Tensor", None)
    return tensor if isinstance(tensor, type) else None


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a ``torch.Tensor`` (a subclass included)."""
    tensor = tensor_type()
    return tensor is not None and isinstance(value, tensor)


def is_jax_array(value: Any) -> bool:
    """Whether ``value`` is a ``jax.Array`` (JAX imported by the user's code)."""
    jax = sys.modules.get("jax")
    array = getattr(jax, "Array", None)
    return isinstance(array, type) and isinstance(value, array)


def array_dtype(torch_dtype: Any) -> np.dtype | None:
    """The dtype of an array that holds ``torch_dtype`` values: numpy's own, or integers of the same
    size holding the bits of a floating dtype numpy lacks; None for anything else (quantized...)."""
    if torch_dtype not in _array_dtypes:
        name = dtype_name(torch_dtype)
        if name in _SHARED_DTYPE_NAMES:
            _array_dtypes[torch_dtype] = np.dtype(name)
        elif torch_dtype.is_floating_point or torch_dtype.is_complex:
            _array_dtypes[torch_dtype] = _BITS_DTYPES.get(torch_dtype.itemsize)
        else:
            _array_dtypes[torch_dtype] = None
    return _array_dtypes[torch_dtype]


def dtype_name(torch_dtype: Any) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(torch_dtype).rpartition(".")[2]


def in_memory(tensor: Any) -> bool:
    """Whether ``tensor`` is an exact ``torch.Tensor`` in ordinary CPU memory (strided): what
    ``torch.stack`` can write into an array's memory (autograd and lazy bits are resolved by it)."""
    exact = type(tensor) is tensor_type()  # (a subclass may stack into anything: torch.stack decides)
    return exact and tensor.is_cpu and tensor.layout is sys.modules["torch"].strided


def as_array(tensor: Any) -> tuple[np.ndarray, str] | None:
    """A plain ``tensor`` (module docstring) as an array viewing its memory, and the name of its torch
    dtype (``from_array`` turns the two back into the tensor); None if it is not plain."""
    if not in_memory(tensor) or tensor.requires_grad or tensor.is_conj() or tensor.is_neg():
        return None
    dtype = array_dtype(tensor.dtype)
    if dtype is None:
        return None
    name = dtype_name(tensor.dtype)
    if dtype.name != name:
        tensor = tensor.view(_torch_dtype(dtype))  # its bits: the same shape and strides
    return tensor.numpy(), name


def from_array(array: np.ndarray, name: str) -> Any:
    """The tensor ``as_array`` gave ``array`` for: ``torch.from_numpy(array)``, its bits viewed as
    ``name`` if it is not numpy's dtype. It views ``array`` and keeps it alive; torch is imported
    if the process has not yet (a consumer given tensors its workers made)."""
    torch = sys.modules.get("torch") or importlib.import_module("torch")
    tensor = torch.from_numpy(array)
    return tensor if array.dtype.name == name else tensor.view(getattr(torch, name))


def _torch_dtype(dtype: np.dtype) -> Any:
    return getattr(sys.modules["torch"], dtype.name)


def storage_bounds(tensor: Any) -> tuple[int, int] | None:
    """``(first, past the last)`` address of the memory under ``tensor`` (its whole storage); None
    when it has none to look at (a sparse tensor)."""
    try:
        storage = tensor.untyped_storage()
        start = storage.data_ptr()
        return start, start + storage.nbytes()
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


def copy_tensor(tensor: Any) -> Any:
    """A copy of ``tensor`` in fresh memory, a leaf that requires grad if ``tensor`` did."""
    copy = tensor.detach().clone()
    return copy.requires_grad_() if tensor.requires_grad else copy
