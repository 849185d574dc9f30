"""A seeded bijection on ``[0, size)``, evaluated for any array of values without materialising it.

An epoch's order is a permutation of ``n`` samples; holding it costs ``8 n`` bytes and drawing it
``O(n)`` time (a source of 10^10 samples: 75 GiB). Here a permutation is a *function*: ``permute(x,
size, keys)`` gives the images of the values ``x`` in ``O(len(x))`` time and memory, whatever ``size``
is, and ``unpermute`` undoes it. The rest of the package never needs more than a batch's worth.

How (see ``docs/design.md``, "Order and determinism", for why each choice):

* **A Feistel network on a grid.** ``[0, size)`` sits inside the grid ``[0, a) x [0, b)`` with
  ``a = ceil(sqrt(size))`` and ``b = ceil(size / a)``: ``D = a * b`` values, fewer than ``a`` of them
  beyond ``size``. A round splits ``x`` into ``hi, lo = divmod(x, r)`` and returns
  ``lo * s + (hi + F(lo)) % s``, with ``(r, s)`` alternating between ``(a, b)`` and ``(b, a)``: each
  round is a bijection of ``[0, D)`` whatever ``F`` is, and is undone by subtracting ``F`` again.
* **Mixing.** ``F(lo)`` is the top 32 bits of splitmix64's finaliser of ``lo + key``, scaled to
  ``[0, s)``; one 64-bit key per round from NumPy's ``SeedSequence`` hash of ``(seed, epoch, salt)``.
  ``ROUNDS`` rounds.
* **Cycle-walking.** A value the network sends to ``[size, D)`` is sent through the network again
  until it lands in ``[0, size)``: the result is a bijection of ``[0, size)``. A walk steps only over
  values outside ``[0, size)``, each of which lies on the walk of one value at most (the one before it
  on its cycle), so one epoch's walks together take at most ``D - size < a`` extra passes, and one
  value's at most ``D - size``; a value needs a second pass with probability ``(D - size) / D < 1 / a``.

Everything is vectorised over ``uint64`` arrays (products wrap modulo 2^64, which the mixing wants);
``size`` and the keys may be one value for all of ``x`` or one per element (the windows of
``shuffle="block"`` each have their own).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# One pass of the network: (values, a, b, keys) -> values.
Network = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]

# Feistel rounds. Simple statistics of whole permutations (tests/unit/test_permutation.py) tell 3
# rounds from random (the gaps between neighbours' images) and 4 (pairs ``a`` apart, which share their
# low half); 5 and more pass. Twice the last broken count: 4096 values cost ~0.25 ms, 2 us per 32.
ROUNDS = 8

_U64 = np.uint64
_MIX_1 = _U64(0xBF58476D1CE4E5B9)  # splitmix64's multipliers (Stafford's variant 13)
_MIX_2 = _U64(0x94D049BB133111EB)
_GOLDEN = _U64(0x9E3779B97F4A7C15)  # odd: j -> j * _GOLDEN is a bijection of 64-bit words
_SHIFT_30, _SHIFT_27, _SHIFT_31, _SHIFT_32 = _U64(30), _U64(27), _U64(31), _U64(32)
_ONE = _U64(1)


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on a ``uint64`` array: a bijection of 64-bit words in which
    every input bit moves about half of the output bits (a new array; ``z`` is left alone)."""
    z = z ^ (z >> _SHIFT_30)
    z *= _MIX_1
    z ^= z >> _SHIFT_27
    z *= _MIX_2
    z ^= z >> _SHIFT_31
    return z


def round_keys(seed: int, epoch: int, salt: int) -> np.ndarray:
    """The ``ROUNDS`` 64-bit keys of one permutation: a pure function of ``(seed, epoch, salt)``."""
    return np.random.SeedSequence([seed, epoch, salt]).generate_state(ROUNDS, np.uint64)


def keys_per_element(keys: np.ndarray, group: np.ndarray) -> np.ndarray:
    """``keys`` made distinct for each value of ``group`` (a ``uint64`` array): shape ``(ROUNDS, len(group))``,
    one independent-looking key set per group (the windows of a block order)."""
    return mix64(keys[:, None] + group[None, :] * _GOLDEN)


def grid(size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The grid ``(a, b)`` that holds ``[0, size)``: ``a = ceil(sqrt(size))``, ``b = ceil(size / a)``,
    elementwise (``size >= 1``, ``uint64``); ``a * b - size < a``."""
    a = np.ceil(np.sqrt(size.astype(np.float64))).astype(np.uint64)
    a = np.maximum(a, _ONE)
    # float64 is off by at most one here, for any 64-bit size: correct to the exact ceiling.
    a += (a * a < size).astype(np.uint64)
    a -= (((a - _ONE) * (a - _ONE)) >= size).astype(np.uint64) * (a > _ONE)
    return a, (size + a - _ONE) // a


def _round_function(lo: np.ndarray, key: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``F(lo)`` in ``[0, s)``: the top 32 bits of ``mix64(lo + key)`` (its last step, which only
    mixes the top bits into the bottom ones, left out) scaled to ``[0, s)`` (``s < 2^32``) by a
    multiplication instead of a division."""
    z = lo + key
    z ^= z >> _SHIFT_30
    z *= _MIX_1
    z ^= z >> _SHIFT_27
    z *= _MIX_2
    z >>= _SHIFT_32
    z *= s
    z >>= _SHIFT_32
    return z


def _add_mod(x: np.ndarray, y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``(x + y) % s`` for ``x`` in ``[0, s)`` and ``y`` in ``[0, s]``, in place in ``x``, without a division
    or a branch: below ``s``, ``x - s`` wraps around to more than ``x``, so the smaller of the two is right."""
    x += y
    np.minimum(x, x - s, out=x)
    return x


def _feistel(x: np.ndarray, a: np.ndarray, b: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """One pass of the network over ``x`` (values in ``[0, a * b)``); ``keys`` has one row per round.

    ``x`` is held as ``(hi, lo)``, ``lo`` in ``[0, r)`` and ``hi`` in ``[0, s)``; a round turns it into
    ``(lo, (hi + F(lo)) % s)`` on the grid ``(s, r)``. One division in, one multiplication out."""
    hi, lo = np.divmod(x, a)
    r, s = a, b
    for key in keys:
        hi, lo = lo, _add_mod(hi, _round_function(lo, key, s), s)
        r, s = s, r
    return hi * r + lo


def _feistel_inverse(y: np.ndarray, a: np.ndarray, b: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``_feistel`` undone: its rounds backwards, each subtracting what it added."""
    r, s = (a, b) if len(keys) % 2 == 0 else (b, a)
    hi, lo = np.divmod(y, r)
    for key in keys[::-1]:
        r, s = s, r  # the grid the round started from: its ``hi`` in [0, s) is our ``lo``'s range
        hi, lo = _add_mod(lo, s - _round_function(hi, key, s), s), hi
    return hi * r + lo


def _at(values: np.ndarray, where: np.ndarray) -> np.ndarray:
    """``values`` at the positions ``where`` of the batch; a value shared by the whole batch as it is."""
    return values if values.shape[-1] == 1 else values[..., where]


def _walk(step: Network, x: np.ndarray, size: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Apply ``step`` (``_feistel`` or its inverse) to ``x`` and again to every value that left
    ``[0, size)``, until none has: a bijection of ``[0, size)`` (cycle-walking)."""
    a, b = grid(size)
    y = step(x, a, b, keys)
    out = np.flatnonzero(y >= size)
    while out.size:
        y[out] = step(y[out], _at(a, out), _at(b, out), _at(keys, out))
        out = out[y[out] >= _at(size, out)]
    return y


def _arrays(x: np.ndarray, size: int | np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.uint64).reshape(-1)
    size = np.asarray(size, dtype=np.uint64).reshape(-1)
    return x, size, keys.reshape(len(keys), -1)


def permute(x: np.ndarray, size: int | np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The images of ``x`` (values in ``[0, size)``) under the bijection of ``[0, size)`` that ``keys``
    (``round_keys``, or ``keys_per_element``) choose; ``uint64``, the shape of ``x`` flattened.
    ``size`` is one size for all, or one per element. ``O(len(x))``."""
    return _walk(_feistel, *_arrays(x, size, keys))


def unpermute(y: np.ndarray, size: int | np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The values whose images are ``y``: ``unpermute(permute(x, s, k), s, k) == x``."""
    return _walk(_feistel_inverse, *_arrays(y, size, keys))
