"""The Ray executor keeps the contract's failure rules: the bound, lost actors, user errors, timeout, close."""

from __future__ import annotations

import gc
import os
import signal
import time

import numpy as np
import pytest
from helpers import AheadSource, consume_within_the_bound
from rayhelpers import Boom, alive_actors, digests, fail_at, owned_objects, processes_stream, slow

import prefetch

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

DATA_X = np.arange(400 * 3, dtype=np.float32).reshape(400, 3)
DATA_Y = np.arange(400)


def test_prefetch_bounds_work_done_ahead_of_a_slow_consumer(local_ray, tmp_path):
    source = AheadSource(400, 4, str(tmp_path))
    depth = 4
    options = {"batch_size": 4, "shuffle": False, "workers": 3, "prefetch": depth, "epochs": 1}
    with prefetch.Loader(source, executor="ray", **options) as loader:
        consume_within_the_bound(loader, source, depth)
        assert loader.stats().max_fill <= depth


def test_an_actor_killed_mid_run_is_replaced_and_the_stream_is_unchanged(local_ray):
    options = {"batch_size": 8, "epochs": 1, "seed": 7, "transform": slow(0.005)}
    expected = digests(processes_stream(DATA_X, DATA_Y, **options))
    with prefetch.Loader(DATA_X, DATA_Y, workers=2, retries=1, executor="ray", **options) as loader:
        got = []
        for batch in loader:
            got.append(batch)
            if len(got) == 10:
                victim = next(iter(loader.stats().worker_nodes))
                os.kill(victim, signal.SIGKILL)  # the actor's process, mid-batch
        stats = loader.stats()
    assert stats.restarts == 1
    assert digests(got) == expected


class KillOnce:
    """A source whose sample ``index`` SIGKILLs the process loading it (every time)."""

    def __init__(self, n: int, index: int):
        self.n, self.index = n, index

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if i == self.index:
            os.kill(os.getpid(), signal.SIGKILL)
        return np.full(2, i)


def test_a_batch_that_kills_its_actor_past_retries_raises_worker_died(local_ray):
    got = []
    options = {"batch_size": 8, "shuffle": False, "epochs": 1, "workers": 2, "retries": 1, "executor": "ray"}
    with prefetch.Loader(KillOnce(64, 21), **options) as loader, pytest.raises(prefetch.WorkerDiedError) as caught:
        for batch in loader:
            got.append(batch)
    assert len(got) == 2 and caught.value.batch == 2
    assert 21 in caught.value.indices and "retries=1" in str(caught.value)


def test_user_errors_keep_their_type_with_sample_and_batch(local_ray):
    options = {"batch_size": 10, "shuffle": False, "epochs": 1, "workers": 2, "executor": "ray"}
    with prefetch.Loader(DATA_X, DATA_Y, transform=fail_at(37), **options) as loader, pytest.raises(Boom) as caught:
        list(loader)
    assert str(caught.value) == "sample 37 is bad"
    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert "sample 37" in notes and "batch 3" in notes


def test_lambdas_closures_memmaps_and_files_travel(local_ray, tmp_path):
    path = tmp_path / "x.dat"
    mapped = np.memmap(path, dtype=np.float32, mode="w+", shape=(120, 3))
    mapped[:] = np.arange(360).reshape(120, 3)
    mapped.flush()
    files = []
    for i in range(120):
        files.append(str(tmp_path / f"{i}.npy"))
        np.save(files[-1], np.full(2, i, dtype=np.int64))
    view = np.memmap(path, dtype=np.float32, mode="r", shape=(120, 3))[10:110]  # a region: 10 rows in
    scale = np.float32(3)
    options = {"batch_size": 16, "epochs": 1, "seed": 3, "transform": lambda s: (s[0] * scale, s[1], s[2])}
    sources = (view, prefetch.Files(files[:100]), list(range(100)))
    expected = digests(processes_stream(*sources, **options))
    with prefetch.Loader(*sources, workers=2, executor="ray", **options) as loader:
        assert digests(list(loader)) == expected


def stuck_at_sample_20(sample):
    if int(sample[1]) == 20:
        time.sleep(60)
    return sample


def test_timeout_kills_the_actor_and_raises_worker_timeout(local_ray):
    options = {"batch_size": 10, "shuffle": False, "epochs": 1, "workers": 2, "timeout": 2.0, "executor": "ray"}
    loader = prefetch.Loader(DATA_X, DATA_Y, transform=stuck_at_sample_20, **options)
    started = time.monotonic()
    with loader, pytest.raises(prefetch.WorkerTimeoutError) as caught:
        for _ in loader:
            started = time.monotonic()  # the wait for the stuck batch starts now (not with the actors' start-up)
    assert caught.value.batch == 2 and time.monotonic() - started < 20
    assert alive_actors() == []


def _leaves_nothing(stop) -> None:
    """Start a loader over a 4 MiB source, take 5 batches, end it with ``stop``: no actor of it stays
    alive, and no object of it (source, configuration, batches) stays referenced from here."""
    before = owned_objects()
    big = np.zeros((64, 256, 256), dtype=np.uint8)
    loader = prefetch.Loader(big, batch_size=8, workers=3, seed=0, executor="ray")
    stop(loader)
    gc.collect()
    deadline = time.monotonic() + 10
    while alive_actors() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive_actors() == []
    assert owned_objects() - before == set()


def test_close_mid_stream_leaves_no_actor_and_no_object(local_ray):
    def close(loader):
        batches = loader.stream()  # endless (epochs=None)
        next(batches)
        # An actor gets batches once it has started: take batches until all three have said hello, so that
        # the close has three live actors to end.
        deadline = time.monotonic() + 60
        while len(loader.stats().worker_nodes) < 3 and time.monotonic() < deadline:
            next(batches)
        assert len(loader.stats().worker_nodes) == 3
        assert len(alive_actors()) == 3
        loader.close()

    _leaves_nothing(close)


def test_a_dropped_generator_or_an_exception_leaves_no_actor(local_ray):
    def drop(loader):
        batches = iter(loader)
        next(batches)
        del batches

    def fail(loader):
        with pytest.raises(ZeroDivisionError), loader:
            for _ in loader:
                1 / 0  # noqa: B018

    _leaves_nothing(drop)
    _leaves_nothing(fail)


def test_close_from_another_thread_wakes_a_blocked_next(local_ray):
    import threading

    loader = prefetch.Loader(DATA_X, DATA_Y, batch_size=10, shuffle=False, workers=2, executor="ray",
                             transform=stuck_at_sample_20)  # fmt: skip
    batches = iter(loader)
    next(batches), next(batches)  # batch 2 holds sample 20: the next next() blocks
    closer = threading.Timer(1.0, loader.close)
    closer.start()
    started = time.monotonic()
    with pytest.raises(prefetch.LoaderClosedError):
        next(batches)
    closer.join()
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 10
    while alive_actors() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive_actors() == []
