"""The global generators' per-batch seeds (core/rng.py): np.random gets all 64 bits of the batch seed."""

from __future__ import annotations

import numpy as np

import prefetch
from prefetch.core.rng import batch_seed

MASK64 = (1 << 64) - 1


def _unshift(y: int, shift: int) -> int:
    """The x with x ^ (x >> shift) == y (64 bits)."""
    x = y
    for _ in range(64 // shift + 1):
        x = y ^ (x >> shift)
    return x


def unsplitmix64(y: int) -> int:
    """The inverse of splitmix64's finaliser: the x that splitmix64 maps to y (each step is a bijection)."""
    y = _unshift(y, 31)
    y = (y * pow(0x94D049BB133111EB, -1, 1 << 64)) & MASK64
    y = _unshift(y, 27)
    y = (y * pow(0xBF58476D1CE4E5B9, -1, 1 << 64)) & MASK64
    y = _unshift(y, 30)
    return (y - 0x9E3779B97F4A7C15) & MASK64


def seed_for(target: int, batch: int) -> int:
    """A loader seed whose batch ``batch`` has the batch seed ``target`` (batch_seed is
    splitmix64(seed ^ splitmix64(batch)), and batch_seed(0, batch) is splitmix64(splitmix64(batch)))."""
    return unsplitmix64(target) ^ unsplitmix64(batch_seed(0, batch))


def np_random_draws(seed: int) -> list[int]:
    """What a transform drawing from np.random gets in batch 0 of a loader with this seed."""

    def draw(sample):
        return np.random.randint(0, 2**31)

    options = {"batch_size": 4, "epochs": 1, "shuffle": False, "seed": seed, "workers": 0, "transform": draw}
    with prefetch.Loader(np.arange(4), **options) as loader:
        return [int(v) for batch in loader.stream() for v in batch]


def test_the_inverse_used_below_is_right():
    for seed, batch in [(0, 0), (1234, 7), (2**63 + 5, 2**40)]:
        value = batch_seed(seed, batch)
        assert batch_seed(seed_for(value, batch), batch) == value


def test_np_random_uses_the_high_32_bits_of_the_batch_seed_too():
    """Two batch seeds with the same low 32 bits: np.random.seed(value & 0xFFFFFFFF) gave both the same draws."""
    low = batch_seed(1234, 0)
    high = low ^ (0x9F31 << 40)  # same low 32 bits, other high ones
    first, second = seed_for(low, 0), seed_for(high, 0)
    assert batch_seed(first, 0) & 0xFFFFFFFF == batch_seed(second, 0) & 0xFFFFFFFF
    assert batch_seed(first, 0) != batch_seed(second, 0)
    assert np_random_draws(first) != np_random_draws(second)
