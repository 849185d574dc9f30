"""The pre-flight check: ``prefetch.doctor()``, ``python -m prefetch doctor``, and the automatic check at start."""

from __future__ import annotations

import resource
import time
import warnings

import numpy as np
import pytest
from helpers import loader_processes

import prefetch
from prefetch.doctor import Report
from prefetch.preflight import LARGE_OBJECT_SOURCE_ITEMS, Finding, preflight, shm_space

DATA = np.zeros((64, 16), np.float32)


def huge_source(sample_bytes: int, n: int = 8) -> np.ndarray:
    """``n`` samples of ``sample_bytes`` each, without the memory: every row views the same byte."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape=(n, sample_bytes), strides=(0, 0))


def prefetch_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, prefetch.PrefetchWarning)]


def test_doctor_reports_the_environment():
    report = prefetch.doctor()
    assert isinstance(report, Report) and report.ok
    assert all(f.level in ("ok", "warn", "error") for f in report.findings)
    text = str(report)
    assert text.startswith("prefetch doctor") and "/dev/shm" in text and "open files" in text
    assert any("thread" in f.what for f in report.findings)


def test_too_little_shm_for_prefetch_batches_fails_at_start_with_the_fix():
    free, _ = shm_space()
    source = huge_source(free // 2 + 1)  # two samples are more than /dev/shm holds
    loader = prefetch.Loader(source, batch_size=2, prefetch=1, workers=1)
    with pytest.raises(prefetch.ShmSpaceError) as info:
        next(iter(loader))
    assert isinstance(info.value, OSError) and isinstance(info.value, prefetch.PrefetchError)
    message = str(info.value)
    assert "/dev/shm" in message and "--shm-size" in message and "prefetch=1" in message
    assert not loader_processes()  # failed before any process was started
    report = prefetch.doctor(loader)
    assert not report.ok and "--shm-size" in report.errors[0].fix
    loader.close()


def test_a_transform_makes_the_size_a_guess_so_little_shm_only_warns(monkeypatch):
    free, _ = shm_space()
    source = huge_source(free // 2 + 1)
    loader = prefetch.Loader(source, batch_size=2, prefetch=1, workers=1, transform=lambda s: s[:8])
    with pytest.warns(prefetch.PrefetchWarning, match="/dev/shm"):
        preflight(loader.config)
    assert prefetch.doctor(loader).ok
    loader.close()


def test_room_for_the_window_but_not_for_held_batches_warns():
    free, _ = shm_space()
    depth = 4
    max_slots = prefetch.Loader(DATA, batch_size=1, prefetch=depth, workers=1).config.max_slots
    # one sample (= one batch) so large that `depth` fit and `max_slots` do not
    source = huge_source(free // (depth + 1))
    loader = prefetch.Loader(source, batch_size=1, prefetch=depth, workers=1)
    assert loader.config.max_slots == max_slots > depth + 1
    with pytest.warns(prefetch.PrefetchWarning, match="keeps batches alive"):
        preflight(loader.config)
    loader.close()


def test_a_large_list_source_warns_about_copy_on_read():
    items = list(range(LARGE_OBJECT_SOURCE_ITEMS + 1))
    with pytest.warns(prefetch.PrefetchWarning, match="numpy array") as record:
        preflight(prefetch.Loader(items, batch_size=4, workers=1).config)
    assert any("source 0 (list of 100,001)" in message for message in prefetch_warnings(record))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        preflight(prefetch.Loader(np.asarray(items), batch_size=4, workers=1).config)
        preflight(prefetch.Loader(items[:1000], batch_size=4, workers=1).config)
    assert not [m for m in prefetch_warnings(record) if "numpy array" in m]


def test_a_low_open_files_limit_warns():
    loader = prefetch.Loader(DATA, batch_size=1, workers=8, prefetch=32)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 100  # the engine's estimate for 8 workers and 32 batches in flight is above half of it
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        report = prefetch.doctor(loader)
        with pytest.warns(prefetch.PrefetchWarning, match="open files"):
            preflight(loader.config)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    (finding,) = [f for f in report.findings if "open files" in f.what]
    assert finding.level == "warn" and f"soft limit of {low}" in finding.what and "ulimit -n" in finding.fix
    assert [f.level for f in prefetch.doctor(loader).findings if "open files" in f.what] == ["ok"]


def test_the_automatic_check_is_cheap():
    config = prefetch.Loader(DATA, batch_size=4, workers=2).config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preflight(config)  # imports done
        rounds = 300
        started = time.perf_counter()
        for _ in range(rounds):
            preflight(config)
        per_call = (time.perf_counter() - started) / rounds
    assert per_call < 1e-3, f"{per_call * 1e6:.0f} us per check"


def test_workers_0_needs_no_check():
    free, _ = shm_space()
    config = prefetch.Loader(huge_source(free // 2 + 1), batch_size=2, prefetch=1, workers=0).config
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preflight(config)  # nothing goes through /dev/shm


def test_the_report_reads_well():
    report = Report([Finding("ok", "fine"), Finding("warn", "something odd", "do this")])
    assert str(report).splitlines() == [
        "prefetch doctor",
        "  [ok   ] fine",
        "  [warn ] something odd",
        "          fix: do this",
        "  warnings: it will run, read them",
    ]
    assert report.ok and report.warnings == [report.findings[1]] and not report.errors
    assert not Report([Finding("error", "broken", "mend it")]).ok
