"""Backpressure, batches held by the user, and the safety of yielded data."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import AheadSource, consume_within_the_bound, wait_until

import prefetch
from prefetch.ipc.segments import LOCK_NAME, SHM_DIR


@pytest.mark.parametrize(("workers", "depth"), [(2, 2), (3, 5)])
def test_backpressure_bounds_the_work_done_ahead(tmp_path, workers, depth):
    source = AheadSource(400, 4, str(tmp_path))
    with prefetch.Loader(source, batch_size=4, shuffle=False, workers=workers, prefetch=depth, epochs=1) as loader:
        consume_within_the_bound(loader, source, depth)


def test_holding_every_batch_of_an_epoch_neither_deadlocks_nor_corrupts():
    data = np.arange(600 * 3, dtype=np.int32).reshape(600, 3)
    with prefetch.Loader(data, batch_size=10, epochs=1, seed=5, workers=2, prefetch=2) as loader:
        held = list(loader)  # 60 batches alive at once with a pool of a few slots
    with prefetch.Loader(data, batch_size=10, epochs=1, seed=5, workers=0) as loader:
        expected = list(loader)
    assert len(held) == 60
    for got, want in zip(held, expected):
        np.testing.assert_array_equal(got, want)


def test_a_held_batch_never_changes_afterwards():
    data = np.arange(2000 * 8, dtype=np.float64).reshape(2000, 8)
    with prefetch.Loader(data, batch_size=16, seed=2, workers=2, prefetch=2) as loader:
        it = loader.stream()  # 203 batches: more than one epoch of 125
        kept = [next(it) for _ in range(3)]
        snapshots = [k.copy() for k in kept]
        views = [k[1:5] for k in kept]  # derived views keep the slot too
        del kept
        for _ in range(200):
            next(it)
        for view, snapshot in zip(views, snapshots):
            np.testing.assert_array_equal(view, snapshot[1:5])


def test_yielded_arrays_are_writable_numpy_arrays():
    with prefetch.Loader(np.zeros((20, 2)), batch_size=4, workers=2) as loader:
        batch = next(iter(loader))
        batch += 1
        assert batch.flags.writeable and float(batch.sum()) == 8.0


def _slots_in_use() -> int:
    """Segments of this process's loaders that hold batches (a grown slot's old segment is unlinked)."""
    prefix = f"prefetch-{os.getpid()}-"
    slots = (name for name in os.listdir(SHM_DIR) if name.startswith(prefix) and "spill" not in name)
    return sum(1 for name in slots if not name.endswith(f"-{LOCK_NAME}"))  # the lock file holds no batch


@pytest.mark.parametrize("drop_each_batch", [False, True])
def test_shared_memory_holds_prefetch_batches_plus_the_one_the_loop_still_binds(drop_each_batch):
    depth = 4
    data = np.zeros((4000, 256), np.float32)
    with prefetch.Loader(data, batch_size=32, workers=2, prefetch=depth) as loader:
        batches = iter(loader)
        batch = None
        peak = 0
        # a plain `for` loop still binds the previous batch while the next is fetched: one slot more
        expected = depth if drop_each_batch else depth + 1
        for step in range(60):
            if drop_each_batch:
                batch = None  # the user keeps nothing while asking for the next batch
            batch = next(batches)
            if step >= 1:  # a training step as long as the workers need to fill the window, however busy the machine
                wait_until(lambda: _slots_in_use() >= expected, timeout_s=10)
            peak = max(peak, _slots_in_use())
        del batch
    assert peak == expected
