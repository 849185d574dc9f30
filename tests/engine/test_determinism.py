"""The batch stream -- order, contents and transform randomness -- is a function of the seed only."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import augment, batch_noise

import prefetch

DATA_X = np.random.default_rng(0).random((203, 5)).astype(np.float32)
DATA_Y = np.arange(203)


def stream(**options) -> list[tuple[np.ndarray, np.ndarray]]:
    options = {
        "batch_size": 16,
        "epochs": 2,
        "seed": 1234,
        "transform": augment,
        "batch_transform": batch_noise,
        **options,
    }
    with prefetch.Loader(DATA_X, DATA_Y, **options) as loader:
        return [(x.copy(), y.copy()) for x, y in loader.stream()]


@pytest.fixture(scope="module")
def reference():
    return stream(workers=0)


def assert_same(batches, reference):
    assert len(batches) == len(reference)
    for (x, y), (rx, ry) in zip(batches, reference):
        np.testing.assert_array_equal(y, ry)
        np.testing.assert_array_equal(x, rx)


@pytest.mark.parametrize(("workers", "prefetch_depth"), [(1, None), (2, None), (2, 1), (4, 3), (4, 16)])
def test_same_batches_for_any_workers_and_prefetch(reference, workers, prefetch_depth):
    assert_same(stream(workers=workers, prefetch=prefetch_depth), reference)


@pytest.mark.start_methods("fork", "spawn", "forkserver")
def test_same_batches_for_every_start_method(reference, start_method):
    assert_same(stream(workers=2, start_method=start_method), reference)


def test_transform_randomness_is_really_used(reference):
    other = stream(workers=0, seed=4321)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(other, reference))
    plain = stream(workers=0, transform=None, batch_transform=None)
    assert not np.array_equal(plain[0][0], reference[0][0])


def test_workers_zero_restores_the_callers_random_state():
    np.random.seed(99)
    expected = np.random.rand()
    np.random.seed(99)
    stream(workers=0, epochs=1)
    assert np.random.rand() == expected


def test_batch_rng_outside_a_loader_says_so():
    with pytest.raises(prefetch.OutsideBatchError, match="batch_rng"):
        prefetch.batch_rng()


def test_randomness_inside_a_source_class_is_deterministic_too():
    from helpers import RandomCropSource

    def run(workers):
        with prefetch.Loader(RandomCropSource(), batch_size=8, epochs=1, seed=3, workers=workers) as loader:
            return [b.tolist() for b in loader]

    assert run(2) == run(0)
