"""Sharing the cores with the training step, through worker processes: the batch stream is the same, byte
for byte, with tuning on and off while the tuner really changes the threads mid-run (the tuner on its own,
without processes: tests/unit/test_tuning.py)."""

from __future__ import annotations

import hashlib

import numpy as np
import psutil
import pytest
from helpers import Fault, augment, faulty_pipeline, fingerprint, loader_processes, wait_until

import prefetch
from prefetch._tuning import TUNE_ROUNDS, TUNE_WARMUP_BATCHES, TUNE_WINDOW_BATCHES

DATA = np.random.default_rng(3).random((96, 6)).astype(np.float32)
LABELS = np.arange(96)
# Batches the tuner needs to decide: its warm-up, then every window of every candidate.
TUNING_BATCHES = TUNE_WARMUP_BATCHES + TUNE_ROUNDS * 2 * TUNE_WINDOW_BATCHES


def stream_digest(**options) -> tuple[str, int]:
    """SHA-256 of every batch of a two-epoch run, and the number of batches."""
    digest = hashlib.sha256()
    count = 0
    options = {"batch_size": 4, "epochs": 2, "seed": 11, "transform": augment, **options}
    with prefetch.Loader(DATA, LABELS, **options) as loader:
        for batch in loader:
            digest.update(repr(fingerprint(batch)).encode())
            count += 1
    return digest.hexdigest(), count


@pytest.mark.timeout(60)
def test_stream_unchanged_while_the_tuner_changes_threads_mid_run(fake_torch):
    reference = stream_digest(workers=0)
    assert reference[1] > TUNING_BATCHES  # the tuner decides inside the run
    tuned = stream_digest(workers=2, train_threads="auto", worker_nice=10)
    assert fake_torch.calls[:2] == [2, 1]  # it did switch the threads while batches were flowing
    untouched = stream_digest(workers=2, train_threads=None, worker_nice=0)
    assert tuned == reference == untouched
    assert fake_torch.threads == 2  # and gave the user's setting back at the end


@pytest.mark.timeout(60)
def test_stream_unchanged_with_a_fixed_thread_count(fake_torch):
    assert stream_digest(workers=2, train_threads=1) == stream_digest(workers=0)
    assert fake_torch.calls == [1, 2]  # set for the loader's life, then restored


@pytest.mark.timeout(30)
@pytest.mark.parametrize("nice", [0, 10, 19])
def test_workers_step_back_by_worker_nice(nice):
    mine = psutil.Process().nice()
    with prefetch.Loader(DATA, batch_size=4, workers=2, worker_nice=nice, seed=0) as loader:
        batches = iter(loader)  # kept: dropping the generator would stop the engine
        next(batches)
        stats = loader.stats()
        me = psutil.Process().pid
        workers = [pid for pid in loader_processes() if psutil.Process(pid).ppid() != me]  # not the coordinator
        assert len(workers) == 2
        # each worker steps back as it starts; one batch made says one has started, not both
        wait_until(lambda: {psutil.Process(pid).nice() for pid in workers} == {min(19, mine + nice)}, timeout_s=10)
    decided = " ".join(stats.decisions)
    assert (f"nice +{nice}" in decided) is (nice > 0)


@pytest.mark.timeout(60)
def test_stream_unchanged_while_the_tuner_runs_and_a_worker_is_replaced(fake_torch, tmp_path):
    """The pool changes mid-run (a worker is SIGKILLed and replaced) while the tuner switches threads."""
    data = np.random.default_rng(5).random((96, 3)).astype(np.float32)

    def digest(**options) -> str:
        sources, pipeline = faulty_pipeline("transform", data, options.pop("fault"))
        hasher = hashlib.sha256()
        with prefetch.Loader(*sources, batch_size=4, epochs=2, seed=3, **pipeline, **options) as loader:
            for batch in loader:
                hasher.update(repr(fingerprint(batch)).encode())
            restarts = loader.stats().restarts
        return hasher.hexdigest(), restarts

    reference, _ = digest(workers=0, fault=None)
    tuned, restarts = digest(workers=2, fault=Fault(40, "sigkill", str(tmp_path / "killed")))
    assert restarts == 1  # one worker died mid-run and was replaced
    assert fake_torch.calls[:2] == [2, 1]  # while the tuner was switching the training threads
    assert tuned == reference
