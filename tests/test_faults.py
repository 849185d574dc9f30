"""Injected faults: what the user sees, and that the output does not change when the engine recovers."""

from __future__ import annotations

import time

import numpy as np
import pytest
from helpers import fail_at

import prefetch

X = np.arange(100, dtype=np.float32).reshape(50, 2)
Y = np.arange(50)


def batches(**options) -> list:
    with prefetch.Loader(X, Y, **{"batch_size": 4, "epochs": 1, "seed": 8, **options}) as loader:
        return [(x.tolist(), y.tolist()) for x, y in loader]


def sample_batch_number(index: int) -> int:
    order = prefetch.Loader(X, Y, batch_size=4, epochs=1, seed=8, workers=0).config.order
    return next(b for b in range(order.num_batches) if index in order.batch_indices(b))


@pytest.mark.parametrize("workers", [0, 2])
def test_user_exception_keeps_its_type_and_names_the_sample(workers):
    with pytest.raises(KeyError) as info:
        batches(workers=workers, transform=fail_at(17, "raise"))
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "sample 17" in notes and f"batch {sample_batch_number(17)}" in notes
    if workers:
        assert isinstance(info.value.__cause__, prefetch.errors.RemoteTraceback)
        assert "fail_at" in str(info.value.__cause__) or "transform" in str(info.value.__cause__)


def test_unpicklable_exception_arrives_as_a_readable_error():
    with pytest.raises(prefetch.RemoteError, match="Unpicklable: cannot travel") as info:
        batches(workers=2, transform=fail_at(5, "unpicklable"))
    assert info.value.type_name == "Unpicklable" and 5 in info.value.indices


@pytest.mark.parametrize("kind", ["sigkill", "exit"])
def test_a_worker_that_dies_once_is_replaced_and_the_output_is_unchanged(tmp_path, kind):
    expected = batches(workers=0)
    marker = str(tmp_path / "died-once")
    with prefetch.Loader(
        X, Y, batch_size=4, epochs=1, seed=8, workers=2, transform=fail_at(21, kind, marker)
    ) as loader:
        got = [(x.tolist(), y.tolist()) for x, y in loader]
        assert loader.stats().restarts == 1
    assert got == expected


def test_a_poison_batch_names_its_pid_signal_and_samples():
    started = time.monotonic()
    with pytest.raises(prefetch.WorkerDiedError, match="SIGKILL") as info:
        batches(workers=2, transform=fail_at(33, "sigkill"))
    assert time.monotonic() - started < 10
    assert info.value.batch == sample_batch_number(33) and 33 in info.value.indices
    assert f"pid {info.value.pid}" in str(info.value)


def test_a_hung_worker_times_out_and_is_killed():
    started = time.monotonic()
    with pytest.raises(prefetch.WorkerTimeoutError) as info:
        batches(workers=2, timeout=1.0, transform=fail_at(9, "hang"))
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - started < 8
    assert 9 in info.value.indices
