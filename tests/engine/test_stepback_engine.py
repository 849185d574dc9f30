"""Workers and the training process under one kernel: their nice value (``worker_nice="auto"``, ``_stepback``)
and the OOM killer's choice (``ipc.lifetime.first_to_go_under_memory_pressure``), read from /proc while a real
loader runs. The nice decision itself, on fake measurements: tests/unit/test_stepback.py."""

from __future__ import annotations

import hashlib
import os
import signal
from functools import partial

import numpy as np
import pytest
from helpers import augment, fingerprint, wait_until

import prefetch
from prefetch import _stepback
from prefetch._stepback import NICE_SPAN_BATCHES, NICE_WARMUP_BATCHES
from prefetch.ipc.lifetime import WORKER_OOM_SCORE_ADJ

DATA = np.random.default_rng(4).random((96, 5)).astype(np.float32)
LABELS = np.arange(96)
OPTIONS = {"batch_size": 2, "epochs": 2, "seed": 7, "transform": augment, "worker_nice": "auto"}  # 48 batches an epoch
FIRST_DECISION = NICE_WARMUP_BATCHES + NICE_SPAN_BATCHES


def thread_nices(pid: int) -> set[int]:
    """The nice value of every thread of process ``pid`` (Linux keeps one per thread)."""
    return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def oom_score_adj(pid: int | str) -> int:
    with open(f"/proc/{pid}/oom_score_adj") as adj:
        return int(adj.read())


def raised_score(pid: int) -> bool:
    return oom_score_adj(pid) == WORKER_OOM_SCORE_ADJ


def reference_digest() -> str:
    digest = hashlib.sha256()
    with prefetch.Loader(DATA, LABELS, workers=0, **OPTIONS) as loader:
        for batch in loader.stream():
            digest.update(repr(fingerprint(batch)).encode())
    return digest.hexdigest()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("compute_bound", [True, False])
def test_the_measured_decision_renices_the_running_workers(monkeypatch, compute_bound):
    """The thresholds are set so that any loop is compute-bound (or none is): what is tested here is that the
    decision reaches every thread of the running workers, not how this machine's timing falls."""
    monkeypatch.setattr(_stepback, "COMPUTE_BOUND_WAIT_SHARE", 2.0 if compute_bound else -1.0)
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    with prefetch.Loader(DATA, LABELS, workers=2, **OPTIONS) as loader:
        batches = loader.stream()
        next(batches)
        workers = loader.engine.worker_pids()
        assert len(workers) == 2 and all(thread_nices(pid) == {mine} for pid in workers)  # they start level
        for _ in range(FIRST_DECISION - 1):
            next(batches)
        stepped = min(19, mine + prefetch.core.config.DEFAULT_WORKER_NICE)
        expected = stepped if compute_bound else mine
        assert all(thread_nices(pid) == {expected} for pid in loader.engine.worker_pids())
        decided = " ".join(loader.stats().decisions)
    assert ("workers stepped back to nice +10" in decided) is compute_bound, decided
    assert ("workers level with the training step" in decided) is not compute_bound, decided


@pytest.mark.timeout(60)
def test_the_oom_killer_takes_a_worker_first_and_its_batches_are_redone(monkeypatch):
    """Workers raise their oom_score_adj (the training process keeps its own); a worker killed as the OOM
    killer kills (SIGKILL) is replaced, the replacement is the first to go again and steps back like the
    others, and the stream is the same as the workers=0 stream."""
    monkeypatch.setattr(_stepback, "COMPUTE_BOUND_WAIT_SHARE", 2.0)  # stepped back at the first span
    monkeypatch.setattr(_stepback, "DATA_BOUND_WAIT_SHARE", 2.0)  # and never back (this loop only waits)
    digest = hashlib.sha256()
    with prefetch.Loader(DATA, LABELS, workers=2, **OPTIONS) as loader:
        batches = loader.stream()
        digest.update(repr(fingerprint(next(batches))).encode())
        first = loader.engine.worker_pids()
        assert len(first) == 2
        for pid in first:  # a worker raises its own score as it starts: the second may not have started yet
            wait_until(partial(raised_score, pid), what=f"worker {pid}'s score")
        assert oom_score_adj("self") < WORKER_OOM_SCORE_ADJ
        os.kill(first[0], signal.SIGKILL)
        replacement = None
        for seen, batch in enumerate(batches, start=2):
            digest.update(repr(fingerprint(batch)).encode())
            new = set(loader.engine.worker_pids()) - set(first)
            if replacement is None and new:
                replacement = new.pop()
            if replacement is not None and seen == FIRST_DECISION + NICE_SPAN_BATCHES:  # a span after the decision
                wait_until(partial(raised_score, replacement), what="the replacement's score")
                assert thread_nices(replacement) == {min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)}
        restarts = loader.stats().restarts
    assert replacement is not None and restarts == 1
    assert digest.hexdigest() == reference_digest()
