"""Sharing the cores with the training step, through worker processes: the batch stream is the same, byte
for byte, with tuning on and off while the tuner really changes the threads mid-run (the tuner on its own,
without processes: tests/unit/test_tuning.py)."""

from __future__ import annotations

import errno
import hashlib
import subprocess
import sys
import threading

import numpy as np
import psutil
import pytest
from helpers import (
    FakeTorch,
    Fault,
    PerThreadFakeTorch,
    augment,
    faulty_pipeline,
    fingerprint,
    loader_processes,
    wait_until,
)

import prefetch
from prefetch import _tuning
from prefetch._tuning import TUNE_WARMUP_BATCHES, TUNE_WINDOW_BATCHES
from prefetch.processes import run as run_module

DATA = np.random.default_rng(3).random((96, 6)).astype(np.float32)
LABELS = np.arange(96)
# Batches the tuner needs to measure its first block (A B B A) of windows: it switches the threads in it.
TUNING_BATCHES = TUNE_WARMUP_BATCHES + 4 * TUNE_WINDOW_BATCHES


def stream_digest(**options) -> tuple[str, int]:
    """SHA-256 of every batch of a two-epoch run, and the number of batches."""
    digest = hashlib.sha256()
    count = 0
    options = {"batch_size": 4, "epochs": 2, "seed": 11, "transform": augment, **options}
    with prefetch.Loader(DATA, LABELS, **options) as loader:
        for batch in loader.stream():
            digest.update(repr(fingerprint(batch)).encode())
            count += 1
    return digest.hexdigest(), count


@pytest.mark.timeout(60)
def test_stream_unchanged_while_the_tuner_changes_threads_mid_run(fake_torch):
    reference = stream_digest(workers=0)
    assert reference[1] > TUNING_BATCHES  # the tuner measures inside the run
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
        # A worker sets its nice value first thing, but the second may not have run yet on a busy machine.
        wait_until(
            lambda: {psutil.Process(pid).nice() for pid in workers} == {min(19, mine + nice)},
            what="both workers at the requested nice value",
        )
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
            for batch in loader.stream():
                hasher.update(repr(fingerprint(batch)).encode())
            restarts = loader.stats().restarts
        return hasher.hexdigest(), restarts

    reference, _ = digest(workers=0, fault=None)
    tuned, restarts = digest(workers=2, fault=Fault(40, "sigkill", str(tmp_path / "killed")))
    assert restarts == 1  # one worker died mid-run and was replaced
    assert fake_torch.calls[:2] == [2, 1]  # while the tuner was switching the training threads
    assert tuned == reference


# --- whose setting it is: the user's threads come back whatever happens to the engine ------------------------


@pytest.fixture
def no_claims_left():
    """The test's tuners let go of every thread they claimed (a claim left over would keep later loaders in
    that thread from tuning)."""
    _tuning.claims.settle()
    before = len(_tuning.claims)
    yield
    _tuning.claims.settle()
    assert len(_tuning.claims) == before


@pytest.mark.timeout(30)
def test_an_engine_that_fails_to_start_leaves_the_users_threads(fake_torch, monkeypatch, no_claims_left):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/dev/shm/prefetch-...")

    monkeypatch.setattr(run_module, "CoordinatorProcess", no_space)
    with (
        prefetch.Loader(DATA, batch_size=4, workers=2, train_threads=1) as loader,
        pytest.raises(OSError, match="No space left on device"),
    ):
        next(iter(loader))
    assert fake_torch.threads == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("first_closed", ["training", "evaluation"])
def test_two_loaders_with_overlapping_lives_give_back_the_users_threads(monkeypatch, first_closed, no_claims_left):
    """An evaluation loader opened while the training loader measures, both iterated by one loop thread."""
    torch = FakeTorch(4)
    monkeypatch.setitem(sys.modules, "torch", torch)
    loaders = {
        "training": prefetch.Loader(DATA, batch_size=4, workers=1, seed=1),
        "evaluation": prefetch.Loader(DATA, batch_size=4, workers=1, seed=2),
    }
    training = loaders["training"].stream()
    for _ in range(TUNING_BATCHES):
        next(training)
        if torch.threads == 2:  # the training loader is measuring with half the threads
            break
    assert torch.threads == 2, torch.calls
    evaluation = loaders["evaluation"].stream()
    for _ in range(TUNING_BATCHES):
        next(training)
        next(evaluation)
    loaders.pop(first_closed).close()
    loaders.popitem()[1].close()
    assert torch.threads == 4


def test_close_from_another_thread_gives_the_loop_thread_its_threads_back(monkeypatch, no_claims_left):
    """A watchdog closes the loader between two batches: torch's setting is per thread, and the loop's
    thread has the user's again once its next ``next()`` has raised."""
    torch = PerThreadFakeTorch(4)
    monkeypatch.setitem(sys.modules, "torch", torch)
    loader = prefetch.Loader(DATA, batch_size=4, workers=1, train_threads=2)
    batches = loader.stream()
    next(batches)
    assert torch.threads == 2
    watchdog = threading.Thread(target=loader.close)
    watchdog.start()
    watchdog.join()
    with pytest.raises(prefetch.LoaderClosedError):
        next(batches)
    assert torch.threads == 4


@pytest.mark.timeout(60)
def test_close_from_another_thread_while_the_loop_waits_gives_its_threads_back(monkeypatch, tmp_path, no_claims_left):
    """The loop is blocked in ``next()`` (its batch hangs in a worker) when the watchdog closes the loader."""
    torch = PerThreadFakeTorch(4)
    monkeypatch.setitem(sys.modules, "torch", torch)
    marker = tmp_path / "hanging"
    sources, pipeline = faulty_pipeline("transform", DATA, Fault(4, "hang", str(marker)))
    loader = prefetch.Loader(*sources, batch_size=4, shuffle=False, workers=1, train_threads=2, **pipeline)
    batches = loader.stream()
    next(batches)  # samples 0-3; batch 1 (samples 4-7) hangs

    waited: list[bool] = []

    def watchdog() -> None:
        try:  # the loop is blocked in next(): inside the engine, its batch hanging in the worker
            waited.append(bool(wait_until(lambda: marker.exists() and loader.engine.busy.locked(), 30.0) >= 0))
        finally:
            loader.close()  # unblocks the loop in any case

    closer = threading.Thread(target=watchdog)
    closer.start()
    with pytest.raises(prefetch.LoaderClosedError):
        next(batches)
    closer.join()
    assert waited == [True]
    assert torch.threads == 4


# Run in a process of its own: importing torch here would turn the tuner on in every later test.
REAL_TORCH_CLOSED_BY_WATCHDOG = """
import threading
import numpy as np
import torch
import prefetch

torch.set_num_threads(4)
loader = prefetch.Loader(np.zeros((64, 3), np.float32), batch_size=4, workers=1, train_threads=2)
batches = loader.stream()
next(batches)
seen = [torch.get_num_threads()]
watchdog = threading.Thread(target=loader.close)
watchdog.start()
watchdog.join()
try:
    next(batches)
except prefetch.LoaderClosedError:
    seen.append(torch.get_num_threads())
print(*seen)
"""


@pytest.mark.timeout(90)
def test_close_from_another_thread_gives_back_real_torch_threads():
    """The same with PyTorch itself, whose intra-op setting is per thread."""
    pytest.importorskip("torch")
    done = subprocess.run(
        [sys.executable, "-c", REAL_TORCH_CLOSED_BY_WATCHDOG], capture_output=True, text=True, timeout=80
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "4"]  # tuned while running, the user's 4 once the loop's next() raised
