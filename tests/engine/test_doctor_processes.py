"""The doctor's checks that start processes: ``python -m prefetch doctor``, and threads running before fork
(the others: tests/unit/test_doctor.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import types
import warnings

import numpy as np
import pytest
from helpers import FakeTorch, native_threads

import prefetch

DATA = np.zeros((64, 16), np.float32)


def prefetch_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, prefetch.PrefetchWarning)]


def test_python_m_prefetch_doctor_prints_the_report():
    done = subprocess.run(
        [sys.executable, "-m", "prefetch", "doctor"], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("prefetch doctor") and "/dev/shm" in done.stdout


def test_threads_running_before_fork_warn_and_suggest_forkserver():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="user-thread")
    thread.start()
    try:
        with (
            pytest.warns(prefetch.PrefetchWarning, match="user-thread") as record,
            prefetch.Loader(DATA, batch_size=4, workers=1, start_method="fork") as loader,
        ):
            next(iter(loader))
        assert any("forkserver" in message for message in prefetch_warnings(record))
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            with prefetch.Loader(DATA, batch_size=4, workers=1, start_method="forkserver") as loader:
                next(iter(loader))
        assert not [m for m in prefetch_warnings(record) if "user-thread" in m]
    finally:
        stop.set()
        thread.join()


def test_a_pre_flight_warning_points_at_the_users_loop():
    """The warning is found deep inside prefetch (the engine's start, in the executor's ``start``), but
    the line it names is the user's own: the ``next()`` that started the loader."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="user-thread")
    thread.start()
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            with prefetch.Loader(DATA, batch_size=4, workers=1, start_method="fork") as loader:
                line = sys._getframe().f_lineno + 1
                next(iter(loader))
    finally:
        stop.set()
        thread.join()
    warned = [w for w in record if issubclass(w.category, prefetch.PrefetchWarning) and "user-thread" in str(w.message)]
    assert warned and (warned[0].filename, warned[0].lineno) == (__file__, line), [
        (w.filename, w.lineno) for w in warned
    ]


def loader_warnings(**options) -> list[str]:
    """The PrefetchWarnings a loader's first batch gives."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with prefetch.Loader(DATA, batch_size=4, workers=1, **options) as loader:
            next(iter(loader))
    return prefetch_warnings(record)


def native_counts(messages: list[str]) -> list[int]:
    return [int(count) for m in messages for count in re.findall(r"(\d+) native threads? with", m)]


def test_native_threads_of_a_runtime_that_breaks_fork_warn(monkeypatch):
    """A framework's runtime threads are invisible to Python (here: 3 of them and the test's one thread);
    with TensorFlow or JAX loaded they are counted from /proc/self/task, and the fix is forkserver."""
    monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
    with native_threads(3):
        forked = loader_warnings(start_method="fork")
        not_forked = loader_warnings(start_method="forkserver")
    assert native_counts(forked) and native_counts(forked)[0] >= 3, forked
    assert any("TensorFlow" in m and 'start_method="forkserver"' in m for m in forked), forked
    assert not native_counts(not_forked), not_forked


def test_native_threads_alone_do_not_warn():
    """Every numpy program runs a BLAS pool, which survives a fork: native threads without a runtime that
    breaks fork are no warning (else every program would get one)."""
    with native_threads(3):
        assert not native_counts(loader_warnings(start_method="fork"))


@pytest.mark.parametrize("limit_threads", [True, False])
def test_torchs_threads_warn_only_where_workers_keep_them(monkeypatch, limit_threads):
    """Workers run torch with one thread (the only setting a forked process survives once the parent ran
    torch's pool); with limit_threads=False they keep the inherited setting, and that is warned about."""
    monkeypatch.setitem(sys.modules, "torch", FakeTorch(2))
    with native_threads(2):
        messages = loader_warnings(start_method="fork", limit_threads=limit_threads, train_threads=None)
    assert bool([m for m in messages if "PyTorch" in m]) is (not limit_threads), messages
