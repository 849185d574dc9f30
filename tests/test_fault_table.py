"""The fault-injection table: every fault, in every stage of the pipeline, under fork and spawn.

A row is ``(fault, stage, start method)``. The fault strikes when a batch touches sample
``BAD``; what the consumer must see:

* ``raise`` -- the original exception type, the worker's traceback as ``__cause__``, and a note
  naming the sample and the batch, exactly as with ``workers=0``;
* ``unpicklable`` -- ``prefetch.RemoteError`` with the type name, the text and the traceback;
* a death (``sys.exit(3)``, ``os._exit(1)``, SIGKILL, SIGSEGV) -- once: a replacement worker redoes the
  batch and the output is byte-identical to an undisturbed run; every time (a poison sample):
  ``WorkerDiedError`` naming the batch, its samples, the pid and the signal or exit code;
* ``hang`` -- with ``timeout``, ``WorkerTimeoutError`` (a ``TimeoutError``) within about ``timeout``
  seconds, and the hung worker killed.

The autouse ``no_leaks`` fixture (conftest) checks after every row that no child process and no
``/dev/shm`` segment is left.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from helpers import DEATHS, STAGES, BadSample, Fault, alive, faulty_pipeline, fingerprint, wait_until

import prefetch
from prefetch.order import Order

START_METHODS = ("fork", "spawn")
N = 24
BATCH_SIZE = 4
SEED = 8
BAD = 13  # the sample the fault strikes at
DATA = np.arange(N * 3, dtype=np.float32).reshape(N, 3)
WORKERS = 2
TIMEOUT_S = 1.0
# How long the worker deaths of a poison batch may take to reach the consumer as an error:
# two deaths, each seen at once through the process sentinel, and one fork of a replacement.
DEATH_REPORT_S = 3.0


def run(stage: str, fault: Fault | None, **options) -> list:
    """Every batch of one epoch, as byte fingerprints."""
    sources, stage_options = faulty_pipeline(stage, DATA, fault)
    options = {"batch_size": BATCH_SIZE, "epochs": 1, "seed": SEED, **stage_options, **options}
    with prefetch.Loader(*sources, **options) as loader:
        return [fingerprint(batch) for batch in loader]


def bad_batch() -> int:
    order = Order(n=N, batch_size=BATCH_SIZE, seed=SEED, epochs=1)
    return next(b for b in range(order.num_batches) if BAD in order.batch_indices(b).tolist())


def where_pattern(stage: str) -> str:
    """How the note names the sample: one sample for per-sample stages, the batch's samples otherwise."""
    if stage in ("load", "transform"):
        return rf"\bsample {BAD}\b"
    return rf"\bsamples \[[0-9, ]*\b{BAD}\b[0-9, ]*\]"


def first_error(stage: str, fault: Fault, **options) -> tuple[BaseException, float]:
    """The error the loader raises, and how long the ``next()`` that raised it took."""
    sources, stage_options = faulty_pipeline(stage, DATA, fault)
    options = {"batch_size": BATCH_SIZE, "epochs": 1, "seed": SEED, **stage_options, **options}
    with prefetch.Loader(*sources, **options) as loader:
        iterator = iter(loader)
        while True:
            started = time.monotonic()
            try:
                next(iterator)
            except StopIteration:
                pytest.fail("the stream ended without the injected fault's error")
            except BaseException as exc:
                return exc, time.monotonic() - started


def notes(exc: BaseException) -> str:
    return "\n".join(getattr(exc, "__notes__", []))


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("stage", STAGES)
def test_raise_keeps_the_type_and_names_the_sample(stage, start_method):
    inline, _ = first_error(stage, Fault(BAD, "raise"), workers=0)
    remote, _ = first_error(stage, Fault(BAD, "raise"), workers=WORKERS, start_method=start_method)
    for exc in (inline, remote):
        assert type(exc) is BadSample, repr(exc)
        assert str(exc) == f"bad sample {BAD}"
        assert re.search(where_pattern(stage), notes(exc)), notes(exc)
        assert f"batch {bad_batch()}," in notes(exc), notes(exc)
    assert isinstance(remote.__cause__, prefetch.errors.RemoteTraceback)
    assert "Traceback" in str(remote.__cause__) and "in strike" in str(remote.__cause__)
    assert re.search(r"worker pid \d+", notes(remote)), notes(remote)
    # the same place named either way: only who ran it differs
    assert notes(inline).split(", in ")[0] == notes(remote).split(", in ")[0]


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("stage", STAGES)
def test_unpicklable_exception_arrives_as_a_readable_remote_error(stage, start_method):
    exc, _ = first_error(stage, Fault(BAD, "unpicklable"), workers=WORKERS, start_method=start_method)
    assert isinstance(exc, prefetch.RemoteError), repr(exc)
    assert exc.type_name == "Unpicklable" and f"Unpicklable: cannot travel {BAD}" in str(exc)
    assert exc.batch == bad_batch() and BAD in exc.indices and exc.pid is not None
    assert "in strike" in str(exc.__cause__)
    assert re.search(where_pattern(stage), notes(exc)), notes(exc)


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("death", list(DEATHS))
def test_a_death_once_is_recovered_byte_identically(tmp_path, death, stage, start_method):
    expected = run(stage, None, workers=0)
    marker = str(tmp_path / "struck")
    got = run(stage, Fault(BAD, death, marker), workers=WORKERS, start_method=start_method)
    assert (tmp_path / "struck").exists()  # the fault did happen
    assert got == expected


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("death", list(DEATHS))
def test_a_poison_sample_raises_worker_died_naming_pid_batch_and_cause(death, stage, start_method):
    exc, waited = first_error(stage, Fault(BAD, death), workers=WORKERS, start_method=start_method)
    assert isinstance(exc, prefetch.WorkerDiedError), repr(exc)
    assert exc.batch == bad_batch() and BAD in exc.indices
    text = str(exc)
    assert DEATHS[death] in text, text
    assert f"pid {exc.pid}" in text and f"batch {exc.batch}" in text and str(list(exc.indices)) in text
    assert "retries=1" in text
    if death == "sigkill":
        assert "OOM" in text
    if death == "sigsegv":
        assert "C extension" in text
    assert waited < DEATH_REPORT_S


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("stage", STAGES)
def test_a_hung_worker_times_out_and_is_killed(stage, start_method):
    exc, waited = first_error(
        stage, Fault(BAD, "hang"), workers=WORKERS, start_method=start_method, timeout=TIMEOUT_S
    )
    assert isinstance(exc, prefetch.WorkerTimeoutError) and isinstance(exc, TimeoutError), repr(exc)
    assert exc.batch == bad_batch() and BAD in exc.indices
    assert f"pid {exc.pid}" in str(exc) and f"batch {exc.batch}" in str(exc)
    assert TIMEOUT_S * 0.9 <= waited < TIMEOUT_S + 2.0
    assert exc.pid is not None and not alive(exc.pid)  # killed (and reaped) before the error was raised


@pytest.mark.parametrize(("retries", "deaths"), [(0, 1), (2, 2)])
def test_the_retry_count_is_an_option(tmp_path, retries, deaths):
    """A batch may kill ``retries`` workers and still be made; one death more is an error."""
    expected = run("transform", None, workers=0)
    recovered = Fault(BAD, "sigkill", str(tmp_path / "recovered"), times=deaths)
    sources, options = faulty_pipeline("transform", DATA, recovered)
    with prefetch.Loader(
        *sources, batch_size=BATCH_SIZE, epochs=1, seed=SEED, workers=WORKERS, retries=deaths, **options
    ) as loader:
        got = [fingerprint(batch) for batch in loader]
        assert loader.stats().restarts == deaths
    assert got == expected and recovered.strikes() == deaths

    fatal = Fault(BAD, "sigkill", str(tmp_path / "fatal"), times=retries + 1)
    exc, _ = first_error("transform", fatal, workers=WORKERS, retries=retries)
    assert isinstance(exc, prefetch.WorkerDiedError), repr(exc)
    assert f"retries={retries}" in str(exc) and fatal.strikes() == retries + 1


def test_a_dead_worker_is_seen_within_a_second():
    """The death of the worker making the batch the consumer waits for reaches it at once, not at a poll."""
    exc, waited = first_error("load", Fault(BAD, "sigkill"), workers=1, retries=0)
    assert isinstance(exc, prefetch.WorkerDiedError), repr(exc)
    assert waited < 1.0
