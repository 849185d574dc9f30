"""Under load: a long run does not grow, and many loaders in a row leak nothing.

The soak run samples, every few hundred batches, the resident memory of the consumer and all its
children (psutil), their open descriptors and threads, and this process's ``/dev/shm`` segments.
After a warm-up (every slot created, every cache filled), memory may grow by less than
max(20 MB, 2 %) and the other figures not at all. The churn run creates, uses and closes loaders one
after another and then compares the same figures with those before it.

The CI versions are short; ``-m slow`` runs longer ones.
"""

from __future__ import annotations

import gc
import os
from collections import deque
from dataclasses import dataclass

import numpy as np
import psutil
import pytest
from helpers import loader_processes, segments_of, wait_until

import prefetch

MEMORY_GROWTH_BYTES = 20 * 2**20
MEMORY_GROWTH_SHARE = 0.02
IMAGES = np.random.default_rng(0).random((4096, 16, 16, 3)).astype(np.float32)
LABELS = np.arange(len(IMAGES))


def flip(sample):
    image, label = sample
    return (image[:, ::-1] if prefetch.batch_rng().random() < 0.5 else image), label


@dataclass(frozen=True)
class Usage:
    rss: int  # bytes, consumer + every child
    fds: int  # consumer + every child
    threads: int  # consumer + every child
    segments: int  # this process's loaders' /dev/shm entries
    processes: int

    @classmethod
    def now(cls) -> Usage:
        me = psutil.Process()
        processes = [me]
        for child in me.children(recursive=True):
            processes.append(child)
        rss = fds = threads = 0
        for process in processes:
            try:
                with process.oneshot():
                    rss += process.memory_info().rss
                    fds += process.num_fds()
                    threads += process.num_threads()
            except psutil.NoSuchProcess:
                continue
        return cls(rss, fds, threads, len(segments_of(os.getpid())), len(processes) - 1)


def allowed_growth(baseline: int) -> float:
    return max(MEMORY_GROWTH_BYTES, MEMORY_GROWTH_SHARE * baseline)


def soak(batches: int, start_method: str | None, every: int = 500, warmup: int = 1000) -> None:
    samples: list[Usage] = []
    kept: deque = deque(maxlen=3)  # a loop that keeps the last few batches alive, as logging or metrics do
    with prefetch.Loader(
        IMAGES, LABELS, batch_size=32, seed=0, workers=2, transform=flip, start_method=start_method
    ) as loader:
        for count, batch in enumerate(loader.stream(), start=1):
            kept.append(batch)
            if count >= warmup and count % every == 0:
                samples.append(Usage.now())
            if count == batches:
                break
        stats = loader.stats()
    assert stats.batches == batches and stats.restarts == 0
    steady, rest = samples[:2], samples[2:]
    assert rest, "run longer than the warm-up and two samples"
    baseline = max(s.rss for s in steady)
    growth = max(s.rss for s in rest) - baseline
    assert growth < allowed_growth(baseline), f"memory grew by {growth / 2**20:.1f} MiB: {samples}"
    for figure in ("fds", "threads", "segments", "processes"):
        before = max(getattr(s, figure) for s in steady)
        after = [getattr(s, figure) for s in rest]
        assert max(after) <= before, f"{figure} grew from {before}: {after}"


def test_soak():
    soak(10_000, start_method=None)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_soak_long(start_method):
    soak(100_000, start_method=start_method, every=5000, warmup=5000)


def churn(loaders: int, workers: int, start_method: str | None = None) -> None:
    def use(number: int) -> None:
        options = dict(workers=workers, start_method=start_method, seed=number)
        how = number % 5
        if how == 0:  # with: close at the end of the block
            with prefetch.Loader(IMAGES[:64], batch_size=8, **options) as loader:
                next(iter(loader))
        elif how == 1:  # break out of a for loop, then close
            loader = prefetch.Loader(IMAGES[:64], LABELS[:64], batch_size=8, **options)
            for _ in loader:
                break
            loader.close()
        elif how == 2:  # a data_generator, dropped
            gen = prefetch.data_generator(8, IMAGES[:64], LABELS[:64], **options)
            next(gen)
            del gen
        elif how == 3:  # a finite loader run to its end, never closed explicitly
            loader = prefetch.Loader(IMAGES[:64], batch_size=8, epochs=1, **options)
            assert sum(1 for _ in loader) == 8
            del loader
        else:  # an epoch loop over an endless loader, dropped with its engine kept for the next epoch
            loader = prefetch.Loader(IMAGES[:64], batch_size=8, **options)
            for _epoch in range(2):
                assert sum(1 for _ in loader) == 8
            del loader

    use(0)  # imports, the forkserver, caches
    gc.collect()
    wait_until(lambda: not loader_processes(), timeout_s=10)
    before = Usage.now()
    for number in range(1, loaders + 1):
        use(number)
    gc.collect()
    wait_until(lambda: not loader_processes(), timeout_s=10)
    after = Usage.now()
    assert after.segments == 0 and after.processes == before.processes
    assert after.fds <= before.fds, f"descriptors: {before.fds} -> {after.fds}"
    assert after.threads <= before.threads, f"threads: {before.threads} -> {after.threads}"
    growth = after.rss - before.rss
    assert growth < allowed_growth(before.rss), f"memory grew by {growth / 2**20:.1f} MiB over {loaders} loaders"


def test_churn_200_loaders():
    churn(200, workers=1)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.start_methods("fork", "spawn", "forkserver")
def test_churn_long(start_method):
    churn(200, workers=2, start_method=start_method)
