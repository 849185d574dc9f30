"""Sources of every kind, and samples of every shape: memmaps, dicts, tuples, strings."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest
from helpers import DictSource, as_list

import prefetch


def run(*sources, **options) -> list:
    with prefetch.Loader(*sources, **{"batch_size": 8, "epochs": 1, "seed": 3, **options}) as loader:
        return [as_list(batch) for batch in loader]


@pytest.mark.start_methods("spawn", "forkserver", "fork")
def test_memmap_source_is_reopened_not_copied(tmp_path, start_method):
    path = tmp_path / "data.npy"
    np.save(path, np.arange(300 * 4, dtype=np.float32).reshape(300, 4))
    mapped = np.load(path, mmap_mode="r")
    view = mapped[7:250:2]  # an offset, strided window of the file
    expected = run(np.array(view), workers=0)
    assert run(view, workers=2, start_method=start_method) == expected


def test_numpy_source_under_spawn_equals_in_process():
    data = np.random.default_rng(1).integers(0, 255, (120, 6, 6), dtype=np.uint8)
    assert run(data, workers=2, start_method="spawn") == run(data, workers=0)


def test_dict_samples_keep_their_fields():
    batches = run(DictSource(), workers=2)
    reference = run(DictSource(), workers=0)
    assert batches == reference
    first = batches[0]
    assert set(first) == {"image", "name", "pair"}
    assert len(first["image"]) == 8 and all(isinstance(n, str) for n in first["name"])
    with prefetch.Loader(DictSource(), batch_size=8, workers=2) as loader:
        batch = next(iter(loader))
    assert batch["image"].shape == (8, 2, 3) and batch["image"].dtype == np.uint8
    assert isinstance(batch["pair"], tuple) and batch["pair"][1].dtype == np.float64


Point = namedtuple("Point", ["xy", "label"])


class PointSource:
    def __len__(self) -> int:
        return 30

    def __getitem__(self, i: int) -> Point:
        return Point(np.array([i, -i]), f"p{i}")


def test_namedtuple_samples_keep_their_type():
    with prefetch.Loader(PointSource(), batch_size=5, workers=2, seed=0) as loader:
        batch = next(iter(loader))
    assert isinstance(batch, Point)
    assert batch.xy.shape == (5, 2) and isinstance(batch.label, list)


def test_string_and_python_number_sources():
    words = [f"w{i}" for i in range(50)]
    numbers = list(range(50))
    batches = run(words, numbers, workers=2)
    assert batches == run(words, numbers, workers=0)
    with prefetch.Loader(words, numbers, batch_size=4, workers=2, seed=1) as loader:
        names, values = next(iter(loader))
    assert isinstance(names, list) and values.dtype == np.int64
    assert [int(n[1:]) for n in names] == values.tolist()


def test_large_string_batches_travel_through_shared_memory():
    words = ["x" * 5000 + str(i) for i in range(64)]  # ~160 KB of pickled strings per batch
    assert run(words, workers=2, batch_size=32) == run(words, workers=0, batch_size=32)


def test_batches_far_larger_than_the_first_grow_their_slot():
    class Growing:
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> np.ndarray:
            return np.full(10 if i < 32 else 200_000, i, dtype=np.float64)

    with prefetch.Loader(Growing(), batch_size=8, shuffle=False, epochs=1, workers=2, collate="list") as loader:
        sizes = [sum(a.size for a in batch) for batch in loader]
    assert sizes == [80] * 4 + [1_600_000] * 4


def test_non_contiguous_and_object_arrays_from_a_batch_transform():
    data = np.arange(40 * 6, dtype=np.int64).reshape(40, 6)

    def odd(batch):
        return batch[:, ::2], np.array([object(), None] * 2, dtype=object)

    with prefetch.Loader(data, batch_size=4, workers=2, seed=0, batch_transform=odd) as loader:
        strided, objects = next(iter(loader))
    with prefetch.Loader(data, batch_size=4, workers=0, seed=0, batch_transform=odd) as loader:
        expected, _ = next(iter(loader))
    np.testing.assert_array_equal(strided, expected)
    assert objects.dtype == object and objects[1] is None


def test_workers_run_one_blas_thread_unless_told_otherwise():
    from helpers import blas_threads

    with prefetch.Loader(np.zeros((8, 2)), batch_size=4, workers=1, transform=blas_threads) as loader:
        limited = next(iter(loader))
    assert limited[:, 0].max() == 1 and limited[:, 1].max() == 1
    with prefetch.Loader(
        np.zeros((8, 2)), batch_size=4, workers=1, transform=blas_threads, limit_threads=False
    ) as loader:
        free = next(iter(loader))
    import os

    assert free[0, 1] == int(os.environ.get("OMP_NUM_THREADS", "0"))
