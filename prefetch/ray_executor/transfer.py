"""How sources and batches travel between the consumer and the Ray actors (no Ray imported here).

Sources, once per run (``pack_sources`` in the consumer, ``unpack_sources`` in the actor):

* a plain ``numpy.ndarray`` is put in the object store once (``ray.put``) and handed to every actor
  by reference (``InStore``); on the consumer's node actors map it without a copy, other nodes fetch
  it once per node;
* a ``numpy.memmap`` that is a region of its file is reopened read-only by path in each actor
  (``ipc.handles.MemmapFile``): the file must exist at the same path on every node that runs one;
* everything else -- ``prefetch.Files``, lists, user classes -- travels inside the configuration.

Batches: Ray pickles a ``torch.Tensor`` by torch's own reduction, its bytes in band, so the actor
sends each plain tensor as the array viewing it (``portable``: a ``TensorArray``, out of band like
any array), and the consumer makes it a tensor again (``writable``). Arrays Ray returns view the
object store and are read-only; ``writable`` copies them (unless ``copy=False``), so yielded arrays
are writable as the contract says. Both walk the batch with ``core.structure.map_structure``.
See ``docs/design.md`` ("The Ray executor").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..core.config import LoaderConfig
from ..core.structure import map_structure
from ..core.tensors import as_array, from_array, tensor_type
from ..ipc.handles import MemmapFile


@dataclass(frozen=True)
class InStore:
    """Source ``position`` is the ``position``-th array handed to the actor from the object store."""

    position: int


def actor_config(config: LoaderConfig, sources: tuple[Any, ...]) -> LoaderConfig:
    """The configuration the actors receive: ``sources`` packed, and the executor option a name (an
    executor object may hold what must not travel to its own actors)."""
    return replace(config, sources=sources, executor="ray")


def pack_sources(sources: tuple[Any, ...], put: Callable[[Any], Any]) -> tuple[tuple[Any, ...], list[Any]]:
    """Split ``sources`` into what travels in the configuration and the object-store references
    handed to each actor (``put`` is ``ray.put``); see the module docstring."""
    packed: list[Any] = []
    refs: list[Any] = []
    for source in sources:
        handle = MemmapFile.of(source) if isinstance(source, np.memmap) else None
        if handle is not None:
            packed.append(handle)
        elif isinstance(source, np.ndarray):
            packed.append(InStore(len(refs)))
            refs.append(put(np.asarray(source)))  # a memmap that cannot be reopened travels as its data
        else:
            packed.append(source)
    return tuple(packed), refs


def unpack_sources(packed: tuple[Any, ...], arrays: tuple[Any, ...]) -> tuple[Any, ...]:
    """The actor's sources: arrays from the store, memmaps reopened, the rest as they came."""
    out: list[Any] = []
    for source in packed:
        if isinstance(source, InStore):
            out.append(arrays[source.position])
        elif isinstance(source, MemmapFile):
            out.append(source.open())
        else:
            out.append(source)
    return tuple(out)


class TensorArray:
    """A plain tensor on its way from an actor to the consumer: the ``array`` viewing it, and the
    name of its dtype (``core.tensors.as_array``)."""

    __slots__ = ("array", "name")

    def __init__(self, array: np.ndarray, name: str):
        self.array = array
        self.name = name


def portable(batch: Any) -> Any:
    """In the actor: ``batch`` with each plain tensor as a ``TensorArray`` (nothing to do without torch)."""
    tensor = tensor_type()
    if tensor is None:
        return batch

    def leaf(value: Any) -> Any:
        viewed = as_array(value) if type(value) is tensor else None
        return value if viewed is None else TensorArray(*viewed)

    return map_structure(leaf, batch)


def writable(batch: Any, copy: bool = True) -> Any:
    """``batch`` as the user gets it: each ``TensorArray`` a tensor again and, with ``copy``, every
    read-only array (a tensor's too) replaced by a writable copy."""

    def leaf(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return value if value.flags.writeable or not copy else value.copy()
        if isinstance(value, TensorArray):
            array = value.array
            if array.flags.writeable or copy:
                return from_array(array if array.flags.writeable else array.copy(), value.name)
            with warnings.catch_warnings():  # copy=False: torch warns that the array is read-only
                warnings.simplefilter("ignore", UserWarning)
                return from_array(array, value.name)
        return value

    return map_structure(leaf, batch)
