"""``prefetch.core.permutation``: a seeded bijection of ``[0, size)`` evaluated per batch, and the order built on it.

* every value once, for many sizes (1, 2, 3, primes, 2^k +- 1, 10^6 whole, 10^12 on a sample), and
  ``unpermute`` undoes ``permute``; the grid ``a = ceil(sqrt(size))`` is exact for every 64-bit size;
* cycle-walking stays within its bound, counted (never timed): a whole epoch's walks take at most
  ``D - size`` extra passes, one value's at most ``D - size + 1`` passes in all;
* it mixes: simple statistics of whole permutations look like a random permutation's, and the same
  statistics do tell the weaker networks of 3 and 4 rounds from random (so they can fail);
* the order costs ``O(batch_size)`` per batch and ``O(1)`` memory in ``n``: the values the network
  evaluates are counted, and ``tracemalloc``'s peak is the same for 10^8, 10^10 and 10^12 samples.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from prefetch.core import permutation
from prefetch.core.order import CHUNK_SAMPLES, DEFAULT_BLOCK_SIZE, WINDOW_BLOCKS, Order
from prefetch.core.permutation import ROUNDS, grid, permute, round_keys, unpermute

PRIMES = [2, 3, 5, 7, 11, 13, 97, 101, 1009, 65521, 104729]
POWERS = [(1 << k) + d for k in (1, 2, 3, 7, 8, 12, 16, 17) for d in (-1, 0, 1)]
SIZES = sorted({1, *PRIMES, *POWERS, 1000, 4096, 10**5 + 3})


def domain(size: int) -> int:
    """``D``, the grid's size: what the network permutes before cycle-walking."""
    a = math.isqrt(size - 1) + 1 if size > 1 else 1
    return a * -(-size // a)


# --- a bijection ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "epoch"), [(0, 0), (1, 7), (2**63 - 1, 10**9)])
def test_every_value_once_and_undone(seed, epoch):
    keys = round_keys(seed, epoch, 1)
    for size in SIZES:
        values = np.arange(size, dtype=np.uint64)
        images = permute(values, size, keys)
        assert images.dtype == np.uint64
        assert np.array_equal(np.sort(images), values), size
        assert np.array_equal(unpermute(images, size, keys), values), size


def test_a_million_whole_and_a_trillion_on_a_sample():
    keys = round_keys(3, 0, 1)
    million = permute(np.arange(10**6, dtype=np.uint64), 10**6, keys)
    assert np.array_equal(np.sort(million), np.arange(10**6, dtype=np.uint64))
    size = 10**12
    sample = np.unique(np.random.default_rng(0).integers(0, size, 200_000, dtype=np.uint64))
    images = permute(sample, size, keys)
    assert images.max() < size
    assert len(np.unique(images)) == len(sample)  # no two values of the sample share an image
    assert np.array_equal(unpermute(images, size, keys), sample)


def test_per_element_sizes_and_keys_are_each_their_own_bijection():
    """What a block order's windows use: one size and one key set per element, in one call."""
    sizes = [1, 2, 7, 64, 100]
    base = round_keys(5, 0, 2)
    groups = np.concatenate([np.full(size, g, dtype=np.uint64) for g, size in enumerate(sizes)])
    values = np.concatenate([np.arange(size, dtype=np.uint64) for size in sizes])
    per_element = permutation.keys_per_element(base, groups)
    images = permute(values, np.repeat(np.array(sizes, dtype=np.uint64), sizes), per_element)
    start = 0
    for g, size in enumerate(sizes):
        own = images[start : start + size]
        assert np.array_equal(np.sort(own), np.arange(size, dtype=np.uint64))
        own_keys = permutation.keys_per_element(base, np.array([g], dtype=np.uint64))
        alone = permute(np.arange(size, dtype=np.uint64), size, own_keys)
        assert np.array_equal(own, alone)  # the same bijection as the group's on its own
        start += size


@pytest.mark.parametrize(
    "size",
    [
        1,
        2,
        3,
        4,
        5,
        8,
        9,
        10,
        2**32 - 1,
        2**32,
        2**32 + 1,
        (2**31 - 1) ** 2,
        (2**31 - 1) ** 2 + 1,
        10**12,
        10**18,
        2**62,
        2**63 - 1,
        2**63,
    ],
)
def test_the_grid_is_exact(size):
    a, b = grid(np.array([size], dtype=np.uint64))
    expected = math.isqrt(size - 1) + 1 if size > 1 else 1
    assert int(a[0]) == expected
    assert int(b[0]) == -(-size // expected)
    assert 0 <= int(a[0]) * int(b[0]) - size < int(a[0])


# --- the cost of cycle-walking, counted -----------------------------------------------------------


class Passes:
    """Wraps ``permutation._feistel``: counts its calls (walk rounds) and the values it evaluates."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self.values = 0
        real = permutation._feistel

        def counting(x, a, b, keys):
            self.calls += 1
            self.values += len(x)
            return real(x, a, b, keys)

        monkeypatch.setattr(permutation, "_feistel", counting)


def test_a_whole_epoch_of_walks_is_within_the_bound(monkeypatch):
    passes = Passes(monkeypatch)
    for size in [*range(1, 300), *POWERS, 10**5 + 3]:
        passes.calls = passes.values = 0
        permute(np.arange(size, dtype=np.uint64), size, round_keys(9, size, 1))
        spare = domain(size) - size  # values of the grid outside [0, size): fewer than ceil(sqrt(size))
        assert spare < math.isqrt(size - 1) + 2, size
        # Each spare value lies on one value's walk at most: the epoch's extra passes are at most
        # ``spare``, and no value is sent through the network more than spare + 1 times.
        assert passes.values - size <= spare, size
        assert passes.calls <= spare + 1, size


@pytest.mark.parametrize("size", [10**8 + 7, 10**10, 10**12 + 39])
def test_walks_of_a_batch_of_a_large_domain_are_rare(monkeypatch, size):
    """With ``D - size < sqrt(size)`` a value needs a second pass with probability below ``1 / sqrt(size)``."""
    passes = Passes(monkeypatch)
    for start in range(0, 32 * 200, 32):
        permute(np.arange(start, start + 32, dtype=np.uint64) * np.uint64(size // 6400), size, round_keys(4, 0, 1))
    assert passes.values <= 32 * 200 + 2


# --- mixing ---------------------------------------------------------------------------------------


def chi2_limit(dof: int, z: float = 4.75) -> float:
    """The chi-square value a random sample exceeds with probability ~1e-6 (Wilson-Hilferty)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi2(counts: np.ndarray) -> float:
    expected = counts.mean()
    return float(((counts - expected) ** 2 / expected).sum())


def gap_statistic(images: np.ndarray, stride: int) -> float:
    """Chi-square of the gaps ``(p[i + stride] - p[i]) mod n`` in 64 equal bins: uniform for a random permutation."""
    n = len(images)
    gaps = (images[stride:] - images[:-stride]) % n
    return chi2(np.histogram(gaps, bins=64, range=(0, n))[0])


def grid_statistic(x: np.ndarray, y: np.ndarray, n: int) -> float:
    """Chi-square of the pairs ``(x, y)`` in a 16 x 16 grid of equal cells: uniform if they are unrelated."""
    return chi2(np.histogram2d(x, y, bins=16, range=[[0, n], [0, n]])[0].ravel())


N_STATS = 10**6
STRIDES = (1, 2, 1000, 2000)  # neighbours, and values that share the low half of the grid (a = 1000)


def whole(rounds: int, seed: int = 5, epoch: int = 0) -> np.ndarray:
    keys = np.random.SeedSequence([seed, epoch, 1]).generate_state(rounds, np.uint64)
    return permute(np.arange(N_STATS, dtype=np.uint64), N_STATS, keys).astype(np.int64)


def worst_statistic(images: np.ndarray) -> float:
    """The largest of the gap statistics, each over its 1e-6 limit (>= 1: not random)."""
    return max(gap_statistic(images, stride) for stride in STRIDES) / chi2_limit(63)


def test_a_permutation_looks_random():
    images = whole(ROUNDS)
    n, positions = N_STATS, np.arange(N_STATS)
    assert worst_statistic(images) < 1
    assert grid_statistic(positions, images, n) < chi2_limit(255)  # where a sample lands vs where it was
    assert grid_statistic(images[:-1], images[1:], n) < chi2_limit(255)  # neighbours in the batch
    limit = 5 / math.sqrt(n)  # five standard deviations of a correlation of unrelated values
    assert abs(np.corrcoef(positions, images)[0, 1]) < limit
    assert abs(np.corrcoef(images[:-1], images[1:])[0, 1]) < limit
    assert np.count_nonzero(images == positions) <= 12  # fixed points: about Poisson(1)


def test_epochs_are_unrelated():
    """Where a sample is in epoch 0 says nothing about where it is in epoch 1."""
    first, second = np.empty(N_STATS, np.int64), np.empty(N_STATS, np.int64)
    first[whole(ROUNDS, epoch=0)] = np.arange(N_STATS)
    second[whole(ROUNDS, epoch=1)] = np.arange(N_STATS)
    assert grid_statistic(first, second, N_STATS) < chi2_limit(255)
    assert abs(np.corrcoef(first, second)[0, 1]) < 5 / math.sqrt(N_STATS)


@pytest.mark.parametrize("rounds", [3, 4])
def test_the_statistics_tell_weaker_networks_from_random(rounds):
    """The check above can fail: with too few rounds the same statistics are far over their limit."""
    assert worst_statistic(whole(rounds)) > 1


# --- O(batch_size) per batch, O(1) memory -----------------------------------------------------------

LARGE = [10**8, 10**10, 10**12]


def evaluated(monkeypatch, order: Order, batches: list[int]) -> int:
    passes = Passes(monkeypatch)
    for b in batches:
        assert len(order.batch_indices(b)) == order.batch_size
    monkeypatch.undo()
    return passes.values


@pytest.mark.parametrize("shuffle", [True, "block"])
@pytest.mark.parametrize("n", LARGE)
def test_a_batch_costs_its_samples_whatever_n(monkeypatch, n, shuffle):
    def bound(positions: int) -> int:
        """Values evaluated for ``positions`` positions: each once (a block order: two bijections
        each, and its partial block's place once per epoch), plus cycle-walking -- rare in a
        domain of n, but a window of ``window`` samples may walk ``sqrt(window)`` times."""
        if shuffle is True:
            return positions + 4
        window = WINDOW_BLOCKS * DEFAULT_BLOCK_SIZE
        return 2 * positions + (positions // window + 2) * (math.isqrt(window) + 1) + 4

    order = Order(n=n, batch_size=32, seed=1, shuffle=shuffle)
    assert evaluated(monkeypatch, order, list(range(100))) <= bound(CHUNK_SAMPLES)  # sequential: one chunk
    order = Order(n=n, batch_size=32, seed=1, shuffle=shuffle)
    assert evaluated(monkeypatch, order, [n // 64 + 12345]) <= bound(2 * CHUNK_SAMPLES)  # far out: two at most
    order = Order(n=n, batch_size=100_000, seed=1, shuffle=shuffle)  # its own samples and a chunk each side
    assert evaluated(monkeypatch, order, [3]) <= bound(100_000 + 2 * CHUNK_SAMPLES)


def test_shuffle_off_evaluates_nothing(monkeypatch):
    order = Order(n=10**12, batch_size=32, seed=1, shuffle=False, world_size=3, rank=2)
    assert evaluated(monkeypatch, order, [0, 1, 10**9]) == 0
    assert order.batch_indices(1).tolist() == [3 * i + 2 for i in range(32, 64)]


def peak_bytes(n: int, shuffle: bool | str) -> int:
    """tracemalloc's peak while a new ``Order`` of ``n`` samples makes a few batches (numpy reports its
    buffers to tracemalloc). A first order of the same kind has run before: imports are not counted."""
    Order(n=n, batch_size=32, seed=1, shuffle=shuffle).batch_indices(0)
    tracemalloc.start()
    try:
        order = Order(n=n, batch_size=32, seed=2, shuffle=shuffle, epochs=None)
        for b in (0, 1, 2, n // 64 + 7):
            order.batch_indices(b)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("shuffle", [True, "block", False])
def test_memory_does_not_grow_with_n(shuffle):
    peaks = {n: peak_bytes(n, shuffle) for n in LARGE}
    assert max(peaks.values()) < 2**20, peaks  # a few chunks of 32 KiB and their temporaries
    assert max(peaks.values()) - min(peaks.values()) < 16 * 2**10, peaks
