"""io_threads=k: a batch's samples loaded by k threads, in the batch's order; the stream is the same
for any k (docs/design.md, "io_threads")."""

from __future__ import annotations

import hashlib
import pickle
import random
import threading

import numpy as np
import pytest
from helpers import fingerprint

import prefetch

try:
    import torch
except ImportError:  # the tox envs of the other Pythons run without torch: its rows are skipped there
    torch = None

N = 96


class Records:
    """``(x, label)`` per index; a draw from every generator would change nothing here (see ``draw_all``)."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return np.full(4, i, dtype=np.float32), i


def draw_all(sample: tuple[np.ndarray, int]) -> tuple[np.ndarray, int, np.ndarray]:
    """A transform drawing from random, np.random, torch's generator and batch_rng(), sample after sample."""
    x, label = sample
    from_torch = float(torch.rand(1)) if torch is not None else random.random()
    draws = np.array([random.random(), np.random.rand(), from_torch, prefetch.batch_rng().random()])
    return x * np.float32(draws.sum()), label, draws


def stream_sha(io_threads: int, workers: int, **more: object) -> str:
    options = {"batch_size": 8, "epochs": 2, "seed": 7, "transform": draw_all, **more}
    with prefetch.Loader(Records(), workers=workers, io_threads=io_threads, **options) as loader:
        digest = hashlib.sha256()
        for batch in loader.stream():
            digest.update(pickle.dumps(fingerprint(batch)))
        return digest.hexdigest()


@pytest.mark.timeout(60)
def test_the_stream_is_the_same_for_any_io_threads_and_workers():
    shas = {(k, w): stream_sha(k, w) for k in (1, 2, 8) for w in (0, 2)}
    assert len(set(shas.values())) == 1, shas
    with prefetch.Loader(Records(), batch_size=8, epochs=1, seed=7, workers=0, transform=draw_all) as loader:
        draws = np.concatenate([batch[2] for batch in loader])
    assert len(np.unique(draws[:, 2])) == len(draws)  # torch's (or random's) draws really differ sample to sample


def halve(sample: tuple[np.ndarray, int]) -> tuple[np.ndarray, int]:
    """A deterministic ``load``: what ``cache=`` keeps."""
    return sample[0] / np.float32(2), sample[1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cache", [None, "memory"])
def test_load_and_cache_run_in_the_io_threads_with_the_same_stream(cache):
    """With ``load=`` (and a cache) the whole first stage is threaded: the stream is still the same for any k."""
    shas = {(k, w): stream_sha(k, w, load=halve, cache=cache) for k in (1, 4) for w in (0, 2)}
    assert len(set(shas.values())) == 1, shas
    assert stream_sha(1, 0, load=halve, cache=cache) != stream_sha(1, 0)  # load really ran


class Rendezvous:
    """Every ``__getitem__`` waits until ``parties`` of them are in at once (a barrier, per process):
    a batch of ``parties`` samples loads only if its reads overlap."""

    def __init__(self, parties: int, timeout_s: float = 10.0):
        self.parties, self.timeout_s = parties, timeout_s
        self.barrier: threading.Barrier | None = None

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> np.ndarray:
        if self.barrier is None:  # made in the process that reads (a forked worker has its own)
            self.barrier = threading.Barrier(self.parties, timeout=self.timeout_s)
        self.barrier.wait()
        return np.full(2, i)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "barrier": None}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_reads_overlap(workers):
    with prefetch.Loader(Rendezvous(4), batch_size=4, epochs=1, shuffle=False, workers=workers, io_threads=4) as loader:
        batches = [b.copy() for b in loader]
    assert np.concatenate(batches)[:, 0].tolist() == list(range(N))


@pytest.mark.timeout(30)
def test_reads_do_not_overlap_with_one_thread():
    """The rendezvous is a real check: loads one after another never meet their partner."""
    loader = prefetch.Loader(Rendezvous(2, timeout_s=0.1), batch_size=2, epochs=1, workers=0)
    with loader, pytest.raises(threading.BrokenBarrierError):
        next(iter(loader))


class Failing:
    """Index 3 fails only after index 5 has failed: the batch reports 3, the first in its order."""

    def __init__(self) -> None:
        self.five_failed = threading.Event()

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> np.ndarray:
        if i == 5:
            self.five_failed.set()
            raise KeyError(5)
        if i == 3:
            assert self.five_failed.wait(10)
            raise KeyError(3)
        return np.zeros(2)


@pytest.mark.timeout(30)
def test_the_first_failing_sample_in_batch_order_is_raised():
    loader = prefetch.Loader(Failing(), batch_size=8, shuffle=False, workers=0, io_threads=8)
    with loader, pytest.raises(KeyError) as raised:
        next(iter(loader))
    assert raised.value.args == (3,)


class DrawsWhileLoading:
    def __init__(self, generator: str):
        self.generator = generator

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> np.ndarray:
        draw = {
            "random": random.random,
            "np.random": np.random.rand,
            "torch": lambda: float(torch.rand(1)),
            "batch_rng": lambda: prefetch.batch_rng().random(),
        }[self.generator]
        return np.full(2, draw())


@pytest.mark.parametrize("generator", ["random", "np.random", "torch", "batch_rng"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_source_drawing_random_numbers_in_threads_is_refused(generator, workers):
    if generator == "torch" and torch is None:
        pytest.skip("torch is not installed in this environment")
    with prefetch.Loader(DrawsWhileLoading(generator), batch_size=4, seed=1, workers=workers) as loader:
        next(iter(loader))  # one thread: drawing in __getitem__ is deterministic, and allowed
    threaded = prefetch.Loader(DrawsWhileLoading(generator), batch_size=4, seed=1, workers=workers, io_threads=2)
    with threaded, pytest.raises(RuntimeError, match=r"__getitem__ drew from .* while io_threads > 1"):
        next(iter(threaded))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_io_threads_is_checked(bad):
    with pytest.raises((TypeError, ValueError), match="io_threads"):
        prefetch.Loader(np.zeros((8, 2)), batch_size=2, io_threads=bad)
