"""Per-batch randomness, identical for any number of workers, start method or timing.

Before batch ``b`` is made (in a worker, or in the calling process with
``workers=0``) Python's ``random`` and NumPy's global ``np.random`` are seeded from
``(seed, b)``, and ``batch_rng()`` returns a ``numpy.random.Generator`` seeded from
the same pair. Whatever process makes batch ``b``, its transforms therefore draw
the same numbers. The seeds are derived with splitmix64, so neighbouring batches
get unrelated streams.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from ..errors import OutsideBatchError

_MASK64 = (1 << 64) - 1
# Salt that keeps the batch generator's stream apart from the global ones.
_GENERATOR_SALT = 0x5EED


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


def seed_globals(seed: int, batch: int) -> None:
    """Seed ``random``, ``np.random`` and ``batch_rng()`` for batch ``batch``."""
    value = batch_seed(seed, batch)
    random.seed(value)
    np.random.seed(value & 0xFFFFFFFF)
    _current.seed, _current.batch, _current.generator = seed, batch, None


@contextmanager
def seeded_in_caller(seed: int, batch: int) -> Iterator[None]:
    """``seed_globals`` for ``workers=0``: the caller's global RNG states are restored after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        seed_globals(seed, batch)
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        _current.seed, _current.generator = None, None


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
