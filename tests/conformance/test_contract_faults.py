"""Faults (contract 3.6, 3.9), injected: a lost worker's batches are redone and the stream does not change;
a user error keeps its type and says where it came from; a worker that dies at every try, and a batch that
hangs past ``timeout``, are engine errors of the ``WorkerError`` family, never a hang."""

from __future__ import annotations

import re
import time
import traceback

import pytest
import registry
from helpers import alive, wait_until
from injected import Boom, DieAt, HangAt, HoldOnce, RaiseAt
from workloads import DATA_X, LABELS, OPTIONS, batch_of, digest, reference

import prefetch

LOST_BATCH = 2  # in the window once the consumer holds batch 0 (prefetch=4)
FAULTY_BATCH = 3  # the batches before it are delivered first
# `timeout` also bounds the engine's start-up: a spawned coordinator took up to 1.1 s to start on this
# machine under load (tests/faults/test_fault_table.py), so the hung batch gets 3 s on every executor.
TIMEOUT_S = 3.0
# How long the hung batch hangs: far past TIMEOUT_S, and short enough that an engine that never gives up on
# it fails the test (the batch arrives, no error) well within the test's time limit.
HANG_S = 20.0


def _sample_in(batch: int) -> int:
    """A sample of ``batch`` of the reference stream that no earlier batch holds."""
    return next(s for s in reference()[1][batch] if batch_of(s) == batch)


def _notes(exc: BaseException) -> str:
    return "\n".join(getattr(exc, "__notes__", []))


@pytest.mark.contract(registry.LOST_WORKER)
def test_a_lost_workers_batches_are_redone_and_the_stream_is_unchanged(executor, tmp_path):
    hold = HoldOnce(_sample_in(LOST_BATCH), str(tmp_path / "holder"), then=OPTIONS["transform"])
    options = {**OPTIONS, "transform": hold, "prefetch": 4, "retries": 1}
    with executor.loader(DATA_X, LABELS, **options) as loader:
        stream = loader.stream()
        got = [digest(next(stream))]
        wait_until(lambda: hold.pid() is not None, what="a worker is inside the batch to lose")
        executor.lose_worker(loader, hold.pid())
        got += [digest(batch) for batch in stream]
        restarts = loader.stats().restarts
    assert got == list(reference()[0])
    assert restarts == 1


@pytest.mark.contract(registry.USER_ERROR)
def test_a_user_error_keeps_its_type_and_names_its_sample_batch_and_process(executor):
    sample = _sample_in(FAULTY_BATCH)
    with (
        executor.loader(DATA_X, LABELS, **{**OPTIONS, "transform": RaiseAt(sample)}) as loader,
        pytest.raises(Boom) as caught,
    ):
        for _ in loader.stream():
            pass
    exc = caught.value
    assert type(exc) is Boom and str(exc) == f"sample {sample} is bad"
    notes = _notes(exc)
    assert re.search(rf"\bsample {sample}\b", notes) and re.search(rf"\bbatch {FAULTY_BATCH}\b", notes), notes
    if executor.options["workers"] == 0:
        assert "calling process" in notes, notes
    else:
        found = re.search(r"worker pid (\d+)", notes)
        assert found and int(found.group(1)) > 0, notes
    shown = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    assert "raise Boom(" in shown  # the line that raised, wherever it ran


@pytest.mark.contract(registry.WORKER_DIED)
@pytest.mark.timeout(60)
def test_a_worker_that_dies_at_every_try_is_a_worker_died_error(executor, tmp_path):
    # One epoch: the poison sample is in batch FAULTY_BATCH only (over two it is in a batch of the second
    # epoch too, inside the window: more deaths, each a restart, in an order that varies from run to run).
    sample, retries = _sample_in(FAULTY_BATCH), 1
    die = DieAt(sample, str(tmp_path / "deaths"))
    options = {**OPTIONS, "epochs": 1, "transform": die, "retries": retries}
    with executor.loader(DATA_X, LABELS, **options) as loader:
        with pytest.raises(prefetch.WorkerDiedError) as caught:
            for _ in loader.stream():
                pass
        raised = time.monotonic()
    exc = caught.value
    assert isinstance(exc, prefetch.WorkerError) and isinstance(exc, prefetch.PrefetchError)
    assert exc.batch == FAULTY_BATCH and sample in exc.indices, (exc.batch, exc.indices)
    deaths = dict(die.deaths())  # pid -> when it was killed
    # A death at each try, one of them named. More deaths when one is blamed on another batch: a Ray actor
    # killed just after a call ended loses that call's answer too; that batch is then redone, not given up.
    assert len(deaths) >= retries + 1 and exc.pid in deaths, (exc.pid, deaths)
    assert f"killed {retries + 1} worker(s), retries={retries}" in str(exc), str(exc)
    assert f"pid {exc.pid}" in str(exc) and f"batch {FAULTY_BATCH}" in str(exc), str(exc)
    # Promptly, never a hang: from the death that gave the batch up to the error. (Each death before it costs
    # a restart, which takes what the machine's load makes it: the test's time limit bounds those.)
    took = raised - deaths[exc.pid]
    assert took < executor.settle_s, f"the last death took {took:.1f} s to reach the consumer"


@pytest.mark.contract(registry.TIMEOUT)
@pytest.mark.timeout(60)
def test_a_hung_batch_is_a_worker_timeout_error_and_its_worker_is_stopped(executor):
    sample = _sample_in(FAULTY_BATCH)
    options = {**OPTIONS, "epochs": 1, "transform": HangAt(sample, HANG_S), "timeout": TIMEOUT_S}
    with executor.loader(DATA_X, LABELS, **options) as loader:
        started = time.monotonic()
        with pytest.raises(prefetch.WorkerTimeoutError) as caught:
            for _ in loader.stream():
                started = time.monotonic()  # the next() that raises starts now
        waited = time.monotonic() - started
    exc = caught.value
    assert isinstance(exc, TimeoutError) and isinstance(exc, prefetch.WorkerError)
    assert exc.batch == FAULTY_BATCH and sample in exc.indices, (exc.batch, exc.indices)
    assert TIMEOUT_S * 0.9 <= waited < TIMEOUT_S + executor.settle_s, waited
    assert exc.pid is not None
    wait_until(lambda: not alive(exc.pid), executor.settle_s, what=f"the hung worker {exc.pid} is stopped")
