"""hedge=True: the batch the loop waits for, when late, is made a second time by another worker and the
first copy to arrive is delivered (docs/design.md, "Hedged stragglers"). The stragglers here block on
files, not on time: a straggler's first read waits until the test lets it go (or kills its worker)."""

from __future__ import annotations

import hashlib
import math
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
from prefetch.core import hedging

N = 192
BATCH = 4
READ_S = 0.001  # every read: batches take a few ms, so a margin of a few median batches is not jitter


class Stragglers:
    """Sample ``i`` is ``[i, i]``. The first read of each index in ``slow`` (in any process) writes its pid
    to ``<dir>/first-<i>`` and waits until ``<dir>/go-<i>`` exists; every later read is quick. With
    ``gate``, the second read writes ``<dir>/second-<i>`` and waits for ``<dir>/go2-<i>``."""

    def __init__(self, directory: str, slow: tuple[int, ...] = (), gate: bool = False, n: int = N):
        self.directory, self.slow, self.gate, self.n = Path(directory), slow, gate, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        time.sleep(READ_S)
        if i in self.slow:
            if self._claim(f"first-{i}"):
                self._wait_for(f"go-{i}")
            elif self.gate and self._claim(f"second-{i}"):
                self._wait_for(f"go2-{i}")
        return np.array([i, i], dtype=np.int64)

    def _claim(self, name: str) -> bool:
        return claim_flag(self.directory / name)

    def _wait_for(self, name: str) -> None:
        while not (self.directory / name).exists():  # a flag file: the test's say, not a guess at time
            time.sleep(0.005)


def sha(batches: list) -> str:
    return hashlib.sha256(pickle.dumps([fingerprint(b) for b in batches])).hexdigest()


def reference(tmp_path: Path, n: int = N) -> str:
    with prefetch.Loader(Stragglers(str(tmp_path), n=n), batch_size=BATCH, seed=5, epochs=1, workers=0) as loader:
        return sha([b.copy() for b in loader])


@pytest.fixture(autouse=True)
def reads_not_hedged(monkeypatch):
    """These tests are about late *batches*: a stall the worker does not hedge itself (as a slow transform
    would be). Its reads are not hedged (``core/readahead``, tested in test_hedged_reads.py and
    unit/test_read_hedging.py): no median read is above an infinite floor. The forked workers see it too."""
    monkeypatch.setattr(hedging, "READ_MIN_S", math.inf)


@pytest.fixture
def every_late_batch(monkeypatch):
    """Hedge every late batch (the cap is unit-tested): a busy machine's ordinary late batches must not use up
    the share before the test's straggler comes."""
    monkeypatch.setattr(hedging, "HEDGE_SHARE", 1.0)


def straggler_at(batch: int, n: int = N) -> int:
    """The first sample index of ``batch`` in the seed-5 order."""
    with prefetch.Loader(np.arange(n), batch_size=BATCH, seed=5, epochs=1, workers=0) as loader:
        return int(loader.config.order.batch_indices(batch)[0])


@pytest.mark.timeout(60)
def test_a_straggler_is_delivered_by_its_hedge_once_with_the_same_bytes(tmp_path, every_late_batch):
    """Its first read never finishes: the batches queued behind it on that worker are hedged too when the loop
    waits for them, and the loader's close kills the worker still making it (no_leaks: nothing left)."""
    n = 64
    slow = (straggler_at(12, n),)
    options = {"batch_size": BATCH, "seed": 5, "epochs": 1, "workers": 2, "timeout": 10}
    with prefetch.Loader(Stragglers(str(tmp_path), slow, n=n), hedge=True, **options) as loader:
        batches = [b.copy() for b in loader]
        stats = loader.stats()
    assert len(batches) == n // BATCH
    assert sha(batches) == reference(tmp_path, n)
    assert stats.hedges >= 1
    assert "late batches hedged" in str(stats)


@pytest.mark.timeout(60)
def test_the_losers_places_come_back(tmp_path, every_late_batch):
    """Ten stragglers, three batches apart, each let go once its hedge was delivered: every loser's copy
    arrives late and its place must come back, or the pool of 2 * prefetch + 2 places runs dry (then:
    WorkerTimeoutError). (Two stragglers in a row would block both workers: the hedge waits behind one.)"""
    slow = tuple(straggler_at(b) for b in range(10, 40, 3))
    options = {"batch_size": BATCH, "seed": 5, "epochs": 1, "workers": 2, "prefetch": 2, "timeout": 10}
    batches = []
    with prefetch.Loader(Stragglers(str(tmp_path), slow), hedge=True, **options) as loader:
        for batch in loader:
            batches.append(batch.copy())
            for index in batch[:, 0].tolist():
                if index in slow:
                    (tmp_path / f"go-{index}").touch()  # the loser finishes now, after its hedge was delivered
        stats = loader.stats()
    assert sha(batches) == reference(tmp_path)
    assert stats.hedges >= len(slow)
    assert loader.config.max_slots < len(slow) + loader.config.prefetch  # losers outnumber the spare places


@pytest.mark.timeout(60)
def test_a_hedge_whose_original_worker_dies(tmp_path, every_late_batch):
    """The hedge is under way when the straggler's worker is killed: the batch is redone as well, and still
    delivered once, with the same bytes."""
    slow = straggler_at(12)
    source = Stragglers(str(tmp_path), (slow,), gate=True)

    def kill_then_release() -> None:
        wait_until(lambda: (tmp_path / f"second-{slow}").exists(), timeout_s=30, what="the hedge's read")
        os.kill(int((tmp_path / f"first-{slow}").read_text()), signal.SIGKILL)
        (tmp_path / f"go2-{slow}").touch()

    helper = threading.Thread(target=kill_then_release, daemon=True)
    options = {"batch_size": BATCH, "seed": 5, "epochs": 1, "workers": 2, "timeout": 10}
    with prefetch.Loader(source, hedge=True, **options) as loader:
        batches = iter(loader)
        first = next(batches).copy()
        helper.start()  # once the coordinator is forked: no thread of ours runs at that fork
        batches = [first, *(b.copy() for b in batches)]
        stats = loader.stats()
    helper.join(10)
    assert sha(batches) == reference(tmp_path)
    assert stats.hedges >= 1 and stats.restarts == 1


def test_hedging_is_off_by_default_and_checked():
    assert prefetch.Loader(np.zeros((8, 2)), batch_size=2).config.hedge is False
    with pytest.raises(TypeError, match="hedge"):
        prefetch.Loader(np.zeros((8, 2)), batch_size=2, hedge="yes")
