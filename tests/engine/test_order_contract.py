"""The contract on the order that is a bijection (PRODUCT.md 3.1-3.3 and 3.10), for ``shuffle=True`` and ``"block"``.

* the engine delivers the documented order: the labels of ``workers=0``'s stream are the samples
  ``reference_order`` computes on its own from docs/design.md;
* the whole stream -- indices, contents, transform randomness -- has one SHA-256 for ``workers`` 0 and 2, fork
  and spawn, ``prefetch`` depths 1 and 7, and a resume mid-epoch (from either start method);
* sharded ranks see disjoint samples, together all but ``n % world_size`` of them, every epoch;
* a source of 10^12 samples (a ``len`` and samples made on demand) starts at once with a few hundred KiB of
  order (``tracemalloc``), with workers too, and its batches are the same with and without them.

``iter(loader)`` is one epoch: the streams here are ``loader.stream()``, every epoch.
"""

from __future__ import annotations

import hashlib
import math
import tracemalloc

import numpy as np
import pytest
import reference_order
from helpers import augment, batch_noise, fingerprint

import prefetch

N = 997  # prime: no batch size, block size or world size divides it
BATCH = 16
SEED = 77
EPOCHS = 3
DATA_X = np.random.default_rng(0).random((N, 3)).astype(np.float32)
DATA_Y = np.arange(N)
ORDERS = [pytest.param(True, None, id="shuffle"), pytest.param("block", 10, id="block-10")]


def options(shuffle, block_size, **more):
    return dict(
        batch_size=BATCH,
        epochs=EPOCHS,
        seed=SEED,
        shuffle=shuffle,
        block_size=block_size,
        transform=augment,
        batch_transform=batch_noise,
        **more,
    )


def digest(batches) -> str:
    return hashlib.sha256(repr([fingerprint(batch) for batch in batches]).encode()).hexdigest()


def take(loader: prefetch.Loader, count: int | None = None) -> list:
    stream = loader.stream()
    batches = []
    for batch in stream:
        batches.append(tuple(part.copy() for part in batch) if isinstance(batch, tuple) else batch.copy())
        if count is not None and len(batches) == count:
            break
    stream.close()
    return batches


_REFERENCE: dict = {}


def reference(shuffle, block_size) -> list:
    """The in-process stream (``workers=0``), made once per order."""
    key = (shuffle, block_size)
    if key not in _REFERENCE:
        with prefetch.Loader(DATA_X, DATA_Y, **options(shuffle, block_size, workers=0)) as loader:
            _REFERENCE[key] = take(loader)
    return _REFERENCE[key]


@pytest.mark.parametrize(("shuffle", "block_size"), ORDERS)
def test_the_stream_is_the_documented_order(shuffle, block_size):
    steps = math.ceil(N / BATCH)
    data_epochs = math.ceil(EPOCHS * steps * BATCH / N)  # "wrap": full batches cut from consecutive epochs
    samples = [i for e in range(data_epochs) for i in reference_order.epoch(SEED, e, N, shuffle, block_size or 256)]
    labels = [y.tolist() for _, y in reference(shuffle, block_size)]
    assert labels == [samples[b * BATCH : (b + 1) * BATCH] for b in range(EPOCHS * steps)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("shuffle", "block_size"), ORDERS)
def test_one_stream_for_workers_and_start_methods(shuffle, block_size, start_method):
    expected = digest(reference(shuffle, block_size))
    with prefetch.Loader(DATA_X, DATA_Y, **options(shuffle, block_size, workers=2, start_method=start_method)) as ld:
        assert digest(take(ld)) == expected


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("shuffle", "block_size"), ORDERS)
@pytest.mark.parametrize("depth", [1, 7])
def test_one_stream_for_prefetch_depths(shuffle, block_size, depth):
    expected = digest(reference(shuffle, block_size))
    with prefetch.Loader(DATA_X, DATA_Y, **options(shuffle, block_size, workers=2, prefetch=depth)) as loader:
        assert digest(take(loader)) == expected


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("shuffle", "block_size"), ORDERS)
@pytest.mark.parametrize("taken", [30, 100])  # mid-epoch 0, mid-epoch 1 (63 batches an epoch)
def test_resume_mid_epoch_gives_the_rest_of_the_stream(shuffle, block_size, taken, start_method):
    expected = reference(shuffle, block_size)
    with prefetch.Loader(DATA_X, DATA_Y, **options(shuffle, block_size, workers=2, start_method=start_method)) as ld:
        first = take(ld, taken)
        state = ld.state_dict()
    assert digest(first) == digest(expected[:taken])
    with prefetch.Loader(DATA_X, DATA_Y, **options(shuffle, block_size, workers=2, start_method=start_method)) as ld:
        ld.load_state_dict(state)
        rest = take(ld)
    assert digest(first + rest) == digest(expected)


@pytest.mark.parametrize(("shuffle", "block_size"), ORDERS)
def test_ranks_share_each_epoch_out(shuffle, block_size):
    world_size, epochs = 3, 2
    seen = []
    for rank in range(world_size):
        extra = dict(rank=rank, world_size=world_size, last_batch="short", workers=0, epochs=epochs, transform=None)
        extra["batch_transform"] = None
        with prefetch.Loader(DATA_Y, **{**options(shuffle, block_size), **extra}) as loader:
            steps = len(loader)
            batches = [b.tolist() for b in take(loader)]
        seen.append([[i for batch in batches[e * steps : (e + 1) * steps] for i in batch] for e in range(epochs)])
    for epoch in range(epochs):
        union = [i for rank in range(world_size) for i in seen[rank][epoch]]
        assert len(union) == len(set(union)) == N - N % world_size


class Huge:
    """``n`` samples, none stored: sample ``i`` is its index."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return np.array([i], dtype=np.int64)


def first_batches(n: int, shuffle, **more) -> list[list[int]]:
    with prefetch.Loader(Huge(n), batch_size=32, seed=3, shuffle=shuffle, **more) as loader:
        stream = loader.stream()
        batches = [next(stream)[:, 0].tolist() for _ in range(3)]
        stream.close()
    return batches


@pytest.mark.timeout(30)
@pytest.mark.parametrize("shuffle", [True, "block"])
def test_a_source_of_a_trillion_samples_starts_at_once_in_little_memory(shuffle):
    first_batches(1000, shuffle, workers=0)  # imports and first-use allocations, out of the measurement
    tracemalloc.start()
    try:
        batches = first_batches(10**12, shuffle, workers=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak  # the order of 0.2 would have asked for 8 TB here
    samples = [i for batch in batches for i in batch]
    assert len(set(samples)) == 96 and all(0 <= i < 10**12 for i in samples)
    assert first_batches(10**12, shuffle, workers=2, start_method="fork") == batches
