"""hedge=True inside the workers: a late read is started a second time and the first copy taken; the stream
is the same bytes as without hedging, for any workers (docs/design.md, "Hedged stragglers"). The stragglers
block on events, not on time: a straggler's first read waits until the same read has started again in its
process (a hedge), so a loader that does not hedge reads would hang on it (the test's timeout)."""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import claim_flag, fingerprint, wait_until

import prefetch
from prefetch.core import hedging, readahead, rng, threaded
from prefetch.core.pipeline import make_numbered_batch

N = 256
BATCH = 8
READ_S = 0.001  # every read: slow enough to be hedged (core.hedging.READ_MIN_S), a margin of a few ms


class FirstReadsWait:
    """Sample ``i`` is ``[i, i]``. The first read of an index in ``slow`` in any process (a flag file in
    ``directory``) waits until a second read of it has started in the same process (a hedge; then it returns,
    its copy dropped). With ``kill``, the hedge of ``slow[0]`` writes its pid to ``<directory>/hedge`` and waits
    for ever (to be killed). With ``hang``, the first reads never end (their hedges do)."""

    def __init__(self, directory: Path | None = None, slow: tuple[int, ...] = (), kill: bool = False, hang=False):
        self.directory, self.slow, self.kill, self.hang = directory, slow, kill, hang
        self.lock = threading.Lock()
        self.ends = threading.Event()  # with ``hang``: lets the reads that never end, end (in this process)
        self.waiting: dict[int, threading.Event] = {}  # this process's first reads, waiting for their hedge

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> np.ndarray:
        time.sleep(READ_S)
        if i in self.slow:
            with self.lock:
                hedged = self.waiting.get(i)
                first = hedged is None and self._claim(f"first-{i}")
                if first:
                    hedged = self.waiting[i] = threading.Event()
            if first:
                assert hedged.wait(50), f"the read of sample {i} was not started again"
                if self.hang:
                    self.ends.wait()
            elif hedged is not None:
                if self.kill and i == self.slow[0] and self._claim("hedge"):
                    threading.Event().wait()  # the test kills this process now
                hedged.set()
        return np.array([i, i], dtype=np.int64)

    def _claim(self, name: str) -> bool:
        assert self.directory is not None
        return claim_flag(self.directory / name)


def noisy(sample: np.ndarray) -> np.ndarray:
    """A transform drawing from np.random and batch_rng(): its draws must land where they did without hedging."""
    return sample * 1000 + int(np.random.randint(1000)) + int(prefetch.batch_rng().integers(1000))


def late_samples(batches: range) -> tuple[int, ...]:
    """The first sample of each of ``batches`` in the seed-3 order (far enough in for reads to be measured)."""
    with prefetch.Loader(np.arange(N), batch_size=BATCH, seed=3, epochs=1, workers=0) as loader:
        return tuple(int(loader.config.order.batch_indices(b)[0]) for b in batches)


def stream(source, **options) -> tuple[str, prefetch.Stats]:
    settings = {"batch_size": BATCH, "seed": 3, "epochs": 2, "transform": noisy, "timeout": 55, **options}
    with prefetch.Loader(source, **settings) as loader:
        digest = hashlib.sha256()
        for batch in loader.stream():
            digest.update(pickle.dumps(fingerprint(batch)))
        return digest.hexdigest(), loader.stats()


@pytest.mark.timeout(120)
def test_the_stream_is_the_same_bytes_with_reads_hedged_for_any_workers(tmp_path):
    slow = late_samples(range(16, 34, 3))
    reference, _ = stream(FirstReadsWait(), workers=0)
    assert stream(FirstReadsWait(), workers=2)[0] == reference
    for workers, io_threads in ((0, 1), (2, 1), (2, 3)):
        directory = tmp_path / f"{workers}-{io_threads}"
        directory.mkdir()
        digest, stats = stream(FirstReadsWait(directory, slow), workers=workers, io_threads=io_threads, hedge=True)
        assert digest == reference, (workers, io_threads)
        assert stats.hedged_reads >= len(slow), (workers, io_threads)
        assert "late reads hedged" in str(stats)


class DrawsInRead:
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> float:
        return float(np.random.rand())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize(
    ("io_threads", "words"),
    [
        (1, r"drew from np.random while hedge=True loaded the batch.*use hedge=False"),
        (2, r"drew from np.random while io_threads > 1 and hedge=True loaded .*use io_threads=1 and hedge=False"),
    ],
)
def test_a_source_that_draws_fails_the_batch_with_hedge_on(workers, io_threads, words):
    """Hedged reads run in threads and a hedge reads twice: draws in __getitem__ would land anywhere. It fails
    at once, however fast the reads (a fast source is read in the calling thread, and fails all the same); the
    message names what threaded the reads."""
    options = {"batch_size": 4, "seed": 0, "workers": workers, "io_threads": io_threads, "hedge": True}
    with (
        prefetch.Loader(DrawsInRead(), **options) as loader,
        pytest.raises(RuntimeError, match=words),
    ):
        next(iter(loader))


@pytest.mark.timeout(60)
def test_a_worker_killed_while_its_hedge_reads_is_replaced_and_the_batch_made_again(tmp_path):
    """The straggler's first read waits for its hedge, whose read the test kills in the middle: the batch is
    made again by another worker (the straggler quick there), the stream unchanged."""
    reference, _ = stream(FirstReadsWait(), workers=0, epochs=1)
    flag = tmp_path / "hedge"
    source = FirstReadsWait(tmp_path, late_samples(range(16, 17)), kill=True)
    options = {"batch_size": BATCH, "seed": 3, "epochs": 1, "transform": noisy, "timeout": 55}
    with prefetch.Loader(source, workers=2, hedge=True, **options) as loader:
        batches = loader.stream()
        digest = hashlib.sha256()
        digest.update(pickle.dumps(fingerprint(next(batches))))  # the coordinator is forked: start the killer
        killed = []

        def kill_the_hedging_worker() -> None:
            wait_until(lambda: flag.exists() and flag.read_text(), timeout_s=50, what="the hedge read to start")
            os.kill(int(flag.read_text()), signal.SIGKILL)
            killed.append(True)

        killer = threading.Thread(target=kill_the_hedging_worker)
        killer.start()
        try:
            for batch in batches:
                digest.update(pickle.dumps(fingerprint(batch)))
        finally:
            killer.join()
        stats = loader.stats()
    assert killed and digest.hexdigest() == reference
    assert stats.restarts == 1


@pytest.mark.timeout(60)
def test_a_read_that_never_ends_holds_neither_the_stream_nor_the_workers_end(tmp_path, monkeypatch):
    """Two first reads never end; their hedges do. The stream is whole, and at its end each worker stops on
    its own (exit code 0), without waiting for the thread still reading nor being killed for it. (No batch is
    hedged -- the workers of the last hedged batch are killed at the end, by design -- however busy the machine.)"""
    monkeypatch.setattr(hedging, "HEDGE_MIN_MEASURED", 10**9)
    reference, _ = stream(FirstReadsWait(), workers=0, epochs=1)
    source = FirstReadsWait(tmp_path, late_samples((16, 24)), hang=True)
    loader = prefetch.Loader(source, workers=2, hedge=True, batch_size=BATCH, seed=3, epochs=1, transform=noisy)
    digest = hashlib.sha256()
    engine = None
    for batch in loader:
        engine = engine or loader.engine
        digest.update(pickle.dumps(fingerprint(batch)))
    assert engine is not None and digest.hexdigest() == reference
    assert set(engine.run.worker_exits.values()) == {0}, engine.run.worker_exits
    loader.close()


@pytest.mark.timeout(60)
def test_with_workers_0_a_read_that_never_ends_does_not_hold_the_close(tmp_path):
    reference, _ = stream(FirstReadsWait(), workers=0, epochs=1)
    source = FirstReadsWait(tmp_path, late_samples((16, 24)), hang=True)
    try:
        digest, _ = stream(source, workers=0, hedge=True, epochs=1)  # its close returns
        assert digest == reference
    finally:
        source.ends.set()  # the threads still reading end: nothing of the test is left running
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("prefetch-")], what="reads end")


class AheadStraggler:
    """64 samples, ``[i, i]``, each read 1 ms (batches of 8, ``shuffle=False``: sample ``i`` is in batch ``i // 8``).
    The first read of ``SLOW`` says it started (``first_started``), records which batch the test was making
    (``making``) and waits until a second read of it has started (its hedge). The transform of the sample before
    it waits until that first read has started: it is read ahead."""

    SLOW = 40  # batch 5's first sample: reads are measured (32) by then

    def __init__(self) -> None:
        self.making = -1
        self.lock = threading.Lock()
        self.reads = 0
        self.first_read_during = -1
        self.first_started = threading.Event()
        self.hedge_started = threading.Event()

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> np.ndarray:
        if i == self.SLOW:
            with self.lock:
                self.reads += 1
                first = self.reads == 1
            if first:
                self.first_read_during = self.making
                self.first_started.set()
                assert self.hedge_started.wait(50), "the late read ahead was not started again"
            else:
                self.hedge_started.set()
        time.sleep(READ_S)
        return np.array([i, i], dtype=np.int64)

    def transform(self, sample: np.ndarray) -> np.ndarray:
        if sample[0] == self.SLOW - 1:
            assert self.first_started.wait(50), "the next batch was not read ahead"
        return sample


@pytest.mark.timeout(60)
def test_a_late_read_ahead_is_hedged_when_its_batch_is_waited_for():
    """A worker's read-ahead (io_threads > 1): the straggler's read starts while the batch before is made, and
    its hedge when the worker comes to wait for its batch; the batches are those made without hedging."""
    source = AheadStraggler()
    options = {"batch_size": 8, "shuffle": False, "io_threads": 2, "hedge": True, "seed": 1, "epochs": 1}
    config = prefetch.Loader(source, transform=source.transform, **options).config
    order = config.order
    made = []
    try:
        with rng.seeded_in_caller(0, 0):  # made as a worker makes them, this process's generators given back
            for batch in range(order.num_batches):
                source.making = batch
                upcoming = batch + 1
                ahead = (upcoming, order.batch_indices(upcoming)) if upcoming < order.num_batches else None
                made.append(make_numbered_batch(config, batch, order.batch_indices(batch), ahead=ahead)[0])
    finally:
        source.hedge_started.set()
        readahead.cancel_ahead()
        threaded.end_pools()
    assert source.first_read_during == AheadStraggler.SLOW // 8 - 1  # read ahead, while the batch before was made
    assert readahead.rule_for(config).hedges >= 1
    assert np.concatenate(made)[:, 0].tolist() == list(range(64))
