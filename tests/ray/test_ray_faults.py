"""The Ray executor keeps the contract's failure rules: the bound, lost actors, user errors, timeout, close."""

from __future__ import annotations

import gc
import os
import signal
import time

import numpy as np
import pytest
from driver import Driver, config, take
from rayhelpers import Boom, actor_states, actors_gone, digests, fail_at, owned_objects, processes_stream, slow

import prefetch
from helpers import CountingSource
from prefetch.ray_executor import RayExecutor

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

DATA_X = np.arange(400 * 3, dtype=np.float32).reshape(400, 3)
DATA_Y = np.arange(400)


def test_prefetch_bounds_work_done_ahead_of_a_slow_consumer(local_ray, tmp_path):
    source = CountingSource(400, str(tmp_path / "count"))
    batch_size, depth = 4, 4
    cfg = config(source, batch_size=batch_size, workers=3, prefetch=depth, epochs=1, seed=0)
    driver = Driver(cfg, RayExecutor())
    consumed = 0
    try:
        for _ in driver:
            consumed += 1
            time.sleep(0.05)  # a slow training step: the actors must not run ahead
            assert source.loaded() <= (consumed + depth) * batch_size
            if consumed == 15:
                break
        time.sleep(0.5)  # time to fill up to the bound, and no further
        assert source.loaded() <= (consumed + depth) * batch_size
        assert driver.max_ready <= depth
    finally:
        driver.close()


def test_an_actor_killed_mid_run_is_replaced_and_the_stream_is_unchanged(local_ray):
    options = {"batch_size": 8, "epochs": 1, "seed": 7, "transform": slow(0.005)}
    expected = digests(processes_stream(DATA_X, DATA_Y, **options))
    executor = RayExecutor()
    driver = Driver(config(DATA_X, DATA_Y, workers=2, retries=1, **options), executor)
    got = []
    for batch in driver:
        got.append(batch)
        if len(got) == 10:
            victim = executor.workers()[0].pid
            os.kill(victim, signal.SIGKILL)  # the actor's process, mid-batch
    assert executor.restarts == 1
    assert victim not in [info.pid for info in executor.workers()]
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
    cfg = config(KillOnce(64, 21), batch_size=8, shuffle=False, epochs=1, workers=2, retries=1)
    driver = Driver(cfg, RayExecutor())
    got = []
    with pytest.raises(prefetch.WorkerDiedError) as caught:
        for batch in driver:
            got.append(batch)
    driver.close()
    assert len(got) == 2 and caught.value.batch == 2
    assert 21 in caught.value.indices and "retries=1" in str(caught.value)


def test_user_errors_keep_their_type_with_sample_and_batch(local_ray):
    cfg = config(DATA_X, DATA_Y, batch_size=10, shuffle=False, epochs=1, workers=2, transform=fail_at(37))
    with pytest.raises(Boom, match="sample 37 is bad") as caught:
        take(Driver(cfg, RayExecutor()))
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
    view = np.memmap(path, dtype=np.float32, mode="r", shape=(120, 3))[10:130]  # a region: offset 10 rows
    scale = np.float32(3)
    options = {"batch_size": 16, "epochs": 1, "seed": 3, "transform": lambda s: (s[0] * scale, s[1], s[2])}
    sources = (view[:100], prefetch.Files(files[:100]), list(range(100)))
    expected = digests(processes_stream(*sources, **options))
    got = take(Driver(config(*sources, workers=2, **options), RayExecutor()))
    assert digests(got) == expected


def test_timeout_kills_the_actor_and_raises_worker_timeout(local_ray):
    def stuck_at_batch_2(sample):
        if int(sample[1]) == 20:
            time.sleep(60)
        return sample

    cfg = config(DATA_X, DATA_Y, batch_size=10, shuffle=False, epochs=1, workers=2, timeout=2.0,
                 transform=stuck_at_batch_2)  # fmt: skip
    executor = RayExecutor()
    driver = Driver(cfg, executor)
    started = time.monotonic()
    with pytest.raises(prefetch.WorkerTimeoutError) as caught:
        for _ in driver:
            pass
    assert caught.value.batch == 2 and time.monotonic() - started < 20
    driver.close()


def test_close_mid_stream_leaves_no_actor_and_no_object(local_ray):
    before = owned_objects()
    big = np.zeros((64, 256, 256), dtype=np.uint8)  # 4 MiB source, put in the store once
    executor = RayExecutor()
    driver = Driver(config(big, batch_size=8, workers=3, seed=0), executor)
    for _ in range(5):
        driver.next_batch()
    workers = executor.workers()
    actor_ids = [actor.handle._actor_id.hex() for actor in executor._run.actors]
    assert len(workers) == 3
    assert len(owned_objects() - before) >= 2  # the source and the configuration, at least
    driver.close()
    assert actors_gone(workers) == []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "ALIVE" in actor_states(actor_ids).values():
        time.sleep(0.1)
    assert set(actor_states(actor_ids).values()) == {"DEAD"}
    gc.collect()
    assert owned_objects() - before == set()
