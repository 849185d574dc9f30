"""The doctor's checks that start processes: ``python -m prefetch doctor``, and threads running before fork
(the others: tests/unit/test_doctor.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

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
