"""Per-batch randomness, identical for any number of workers, start method, executor or timing.

Before batch ``b`` is made (in a worker, a Ray actor, or the calling process with
``workers=0``) every global random generator a transform may draw from is seeded from
``(seed, b)``: Python's ``random``, NumPy's global ``np.random``, and torch's global CPU
generator when torch is imported in that process (prefetch never imports torch itself).
``batch_rng()`` returns a ``numpy.random.Generator`` seeded from the same pair. Whatever
process makes batch ``b``, its transforms therefore draw the same numbers.

The seeds come from one 64-bit value per batch (splitmix64, so neighbouring batches get
unrelated streams), and each generator gets it in a form of its own, so no two of them run
the same stream: ``random`` and ``np.random`` are both MT19937 filled by the same
init-by-array routine, so NumPy's key carries a salt word; torch's generator keeps 32 bits
of its seed and fills its state like ``np.random.seed(int)``, so its seed is salted and
mixed again. See ``docs/design.md``, *Order and determinism*, for what is covered and why.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..errors import OutsideBatchError

_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1
# Salts that keep the generators' streams apart (any distinct constants do).
_GENERATOR_SALT = 0x5EED  # batch_rng()'s SeedSequence entropy
_NUMPY_SALT = 0x6E70  # np.random's third key word: its key differs from random's two words
_TORCH_SALT = 0x7043_0000_0000_0000  # mixed into torch's seed before splitmix64


class _Current:
    seed: int | None = None
    batch: int = -1
    generator: np.random.Generator | None = None


_current = _Current()


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def batch_seed(seed: int, batch: int) -> int:
    """The 64-bit seed of batch ``batch``'s global random generators."""
    return _splitmix64(seed ^ _splitmix64(batch))


def torch_generator() -> Any | None:
    """torch's global CPU generator if torch is imported in this process, else None (never imports it).

    Only the CPU generator: ``torch.manual_seed`` would also seed (or queue seeding of) the CUDA, MPS
    and XPU generators, and costs about 100 times more."""
    return getattr(sys.modules.get("torch"), "default_generator", None)


def seed_globals(seed: int, batch: int) -> None:
    """Seed ``random``, ``np.random``, torch's CPU generator (if torch is loaded) and ``batch_rng()``
    for batch ``batch``."""
    value = batch_seed(seed, batch)
    random.seed(value)
    np.random.seed((value & _MASK32, value >> 32, _NUMPY_SALT))
    generator = torch_generator()
    if generator is not None:
        generator.manual_seed(_splitmix64(value ^ _TORCH_SALT))
    _current.seed, _current.batch, _current.generator = seed, batch, None


@contextmanager
def seeded_in_caller(seed: int, batch: int) -> Iterator[None]:
    """``seed_globals`` for ``workers=0``: the caller's global RNG states are restored after."""
    generator = torch_generator()
    torch_state = generator.get_state() if generator is not None else None
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        seed_globals(seed, batch)
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        if generator is not None:
            generator.set_state(torch_state)
        _current.seed, _current.generator = None, None


def global_states() -> tuple[Any, Any, bytes | None]:
    """This process's ``random``, ``np.random`` and torch CPU generator states, for another process to
    continue from (``adopt_global_states``): ``background``'s producer. torch's travels as bytes, so
    unpickling it does not import torch in a spawned process."""
    generator = torch_generator()
    torch_state = generator.get_state().numpy().tobytes() if generator is not None else None
    return random.getstate(), np.random.get_state(), torch_state


def adopt_global_states(states: tuple[Any, Any, bytes | None]) -> None:
    """Continue from ``global_states()`` of another process (a forked child's ``random`` is reseeded at
    fork, a spawned one starts afresh): so the randomness is what it would be in that process. torch's
    state is set if torch is imported here (a spawned process: if unpickling the iterable imported it)."""
    python_state, numpy_state, torch_state = states
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    generator = torch_generator()
    if torch_state is not None and generator is not None:
        torch = sys.modules["torch"]
        generator.set_state(torch.frombuffer(bytearray(torch_state), dtype=torch.uint8))


def current_generator() -> np.random.Generator | None:
    """``batch_rng()``'s generator if it was made for the batch being made, else None (draws nothing)."""
    return _current.generator


def batch_rng() -> np.random.Generator:
    """The random generator of the batch being made, for use inside ``transform``/``batch_transform``.

    Its draws depend only on the loader's seed and the batch number, so augmentations
    are the same for any ``workers``, start method or ``prefetch`` depth. Samples of a
    batch are transformed in order, each continuing the same generator.

    Example::

        def augment(image):
            rng = prefetch.batch_rng()
            return image[:, ::-1] if rng.random() < 0.5 else image
    """
    if _current.seed is None:
        raise OutsideBatchError("prefetch.batch_rng() is only available while a loader is making a batch")
    if _current.generator is None:
        _current.generator = np.random.default_rng([_current.seed, _current.batch, _GENERATOR_SALT])
    return _current.generator
