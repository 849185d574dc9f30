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
from prefetch import _compare, _stepback, consumer
from prefetch._stepback import NICE_SPAN_BATCHES, NICE_WARMUP_BATCHES, NICE_WINDOW_BATCHES
from prefetch.ipc.lifetime import WORKER_OOM_SCORE_ADJ

DATA = np.random.default_rng(4).random((96, 5)).astype(np.float32)
LABELS = np.arange(96)
OPTIONS = {"batch_size": 2, "epochs": 2, "seed": 7, "transform": augment, "worker_nice": "auto"}  # 48 batches an epoch
FIRST_DECISION = NICE_WARMUP_BATCHES + NICE_SPAN_BATCHES


@pytest.fixture(autouse=True)
def rule_on_waiting(monkeypatch):
    """The tests below that do not say otherwise run ``StepBack``, the rule where the workers may not come back
    level once stepped back (``NiceTrial``, the rule where they may, is tested at the end)."""
    monkeypatch.setattr(consumer, "may_lower_nice", lambda base: False)


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
def test_the_measured_decision_renices_the_running_workers(monkeypatch, compute_bound, fake_torch):
    """The thresholds are set so that any loop is compute-bound (or none is): what is tested here is that the
    decision reaches every thread of the running workers, not how this machine's timing falls. The thread
    tuner times its windows meanwhile (``fake_torch``: 2 threads): the waiting is watched all along."""
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


# --- NiceTrial: where the workers may come back level, the loop's rate decides ----------------------------


class Decides(_compare.Comparison):
    """``NiceTrial``'s comparison with its verdict fixed: ``choice`` after one block (the timing of this machine
    is not what is tested here, the windows' priorities and the verdict's reaching every worker thread are)."""

    def __init__(self, choice: str, *args):
        super().__init__(*args)
        self.choice = choice

    def verdict(self) -> _compare.Verdict:
        blocks = len(self.blocks)
        return _compare.Verdict(self.choice if blocks else _compare.NOISE, 1.0, 0.0, blocks, (1.0, 1.0))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("choice", [_compare.A, _compare.B])
def test_the_rate_trial_sets_each_windows_priority_then_the_verdicts(monkeypatch, choice):
    monkeypatch.setattr(consumer, "may_lower_nice", lambda base: True)
    monkeypatch.setattr(_stepback, "Comparison", partial(Decides, choice))
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    stepped = min(19, mine + prefetch.core.config.DEFAULT_WORKER_NICE)
    allowed = _stepback.may_lower_nice(mine)  # the real privilege: without it the first lowering is refused
    windows = {
        NICE_WARMUP_BATCHES + k * NICE_WINDOW_BATCHES: nice for k, nice in enumerate([stepped, mine, mine, stepped])
    }
    verdict_at = NICE_WARMUP_BATCHES + 4 * NICE_WINDOW_BATCHES
    options = {**OPTIONS, "train_threads": None}  # the priority alone
    digest = hashlib.sha256()
    with prefetch.Loader(DATA, LABELS, workers=2, **options) as loader:
        for asked, batch in enumerate(loader.stream(), start=1):
            digest.update(repr(fingerprint(batch)).encode())
            expected = windows.get(asked)
            if asked == verdict_at:
                expected = mine if choice == _compare.B and allowed else stepped
            if expected is not None and (allowed or asked < NICE_WARMUP_BATCHES + NICE_WINDOW_BATCHES):
                for pid in loader.engine.worker_pids():
                    assert thread_nices(pid) == {expected}, (asked, pid)
        decided = " ".join(loader.stats().decisions)
    assert digest.hexdigest() == reference_digest()  # the priority changes how fast a batch comes, never its bytes
    if not allowed:
        assert "lowering a nice value was refused" in decided, decided
    elif choice == _compare.B:
        assert "workers level with the training step (nice +0)" in decided, decided
    else:
        assert "workers stepped back to nice +10, the training step first" in decided, decided


@pytest.mark.timeout(60)
def test_the_priority_and_the_training_threads_are_timed_one_at_a_time(monkeypatch, fake_torch):
    """Each trial's windows run while the other's do not: the priority first, the training threads after."""
    monkeypatch.setattr(consumer, "may_lower_nice", lambda base: True)
    monkeypatch.setattr(_stepback, "Comparison", partial(Decides, _compare.A))
    overlaps, order = [], []
    for owner in ("NiceTrial", "ThreadTuner"):
        cls = getattr(_stepback if owner == "NiceTrial" else prefetch._tuning, owner)
        original = cls._window

        def window(self, setting, original=original, owner=owner):
            engine = live[0]
            other = engine.tuner if owner == "NiceTrial" else engine.stepback
            overlaps.append(other is not None and other.measuring)
            order.append(owner)
            return original(self, setting)

        monkeypatch.setattr(cls, "_window", window)
    live = []
    data = np.arange(200, dtype=np.float32)
    with prefetch.Loader(data, batch_size=1, workers=2, seed=1, worker_nice="auto") as loader:
        batches = loader.stream()
        next(batches)
        live.append(loader.engine)
        for _ in range(150):
            next(batches)
        tuner, trial = loader.engine.tuner, loader.engine.stepback
        assert tuner is not None and isinstance(trial, _stepback.NiceTrial)
        assert trial.trial.settled and tuner.windows, (order, tuner.decision)
    assert not any(overlaps), order
    assert order.index("ThreadTuner") > order.index("NiceTrial")
    assert "NiceTrial" not in order[order.index("ThreadTuner") : order.index("ThreadTuner") + 4]  # a whole block
