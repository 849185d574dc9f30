"""The documented order, written again from docs/design.md ("Order and determinism") in plain Python.

One value at a time, with Python integers, and the whole epoch materialised as a list: nothing here is
shared with ``prefetch.core`` (not the code, not the constants), so a test that compares the two checks
the implementation against the description. Slow on purpose; for small ``n`` only.
"""

from __future__ import annotations

import math

import numpy as np

ROUNDS = 8
MASK = (1 << 64) - 1
SALT_SAMPLES, SALT_BLOCKS, SALT_WINDOWS = 0x5A3D, 0xB10C, 0x3D0E
WINDOW_BLOCKS = 8
GOLDEN = 0x9E3779B97F4A7C15


def keys(seed: int, epoch: int, salt: int) -> list[int]:
    return [int(k) for k in np.random.SeedSequence([seed, epoch, salt]).generate_state(ROUNDS, np.uint64)]


def mix64(z: int) -> int:
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & MASK
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & MASK
    return z ^ (z >> 31)


def round_function(value: int, key: int, modulus: int) -> int:
    """The top 32 bits of splitmix64's finaliser without its last step, scaled to [0, modulus)."""
    z = (value + key) & MASK
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & MASK
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & MASK
    return ((z >> 32) * modulus) >> 32


def bijection(x: int, size: int, round_keys: list[int]) -> int:
    """The Feistel network on the grid a x b, a = ceil(sqrt(size)), cycle-walked into [0, size)."""
    a = math.isqrt(size - 1) + 1 if size > 1 else 1
    b = -(-size // a)
    while True:
        hi, lo = divmod(x, a)
        r, s = a, b
        for key in round_keys:
            hi, lo = lo, (hi + round_function(lo, key, s)) % s
            r, s = s, r
        x = hi * r + lo
        if x < size:
            return x


def epoch(seed: int, e: int, n: int, shuffle: bool | str = True, block_size: int = 256) -> list[int]:
    """Epoch ``e``'s order of range(n): position p holds sample epoch(...)[p]."""
    if shuffle is False:
        return list(range(n))
    if shuffle is True:
        k = keys(seed, e, SALT_SAMPLES)
        return [bijection(p, n, k) for p in range(n)]
    blocks = [list(range(i, min(i + block_size, n))) for i in range(0, n, block_size)]
    block_keys = keys(seed, e, SALT_BLOCKS)
    shuffled = [blocks[bijection(t, len(blocks), block_keys)] for t in range(len(blocks))]
    window_keys = keys(seed, e, SALT_WINDOWS)
    order = []
    for j, first in enumerate(range(0, len(shuffled), WINDOW_BLOCKS)):
        samples = [i for block in shuffled[first : first + WINDOW_BLOCKS] for i in block]
        own = [mix64((key + j * GOLDEN) & MASK) for key in window_keys]
        order += [samples[bijection(q, len(samples), own)] for q in range(len(samples))]
    return order


def shard(seed: int, e: int, n: int, rank: int, world_size: int, shuffle: bool | str = True, block_size: int = 256):
    """Rank ``rank``'s samples of epoch ``e``: positions rank, rank + w, ... of the first n - n % w."""
    return epoch(seed, e, n, shuffle, block_size)[: n - n % world_size][rank::world_size]
