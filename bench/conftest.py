"""The benchmark session: one thread per BLAS, the results collector, the harness fixture and the report.

Every number in the report is measured in this session, side by side with its baselines, on this machine.
At the end of the session ``bench/results/latest.md`` and ``latest.json`` are written and the tables printed.
The harness, the collector and the rendering live in ``harness.py``; the workloads in ``workloads.py``.
"""

from __future__ import annotations

import os

# Before numpy (or torch) is imported anywhere in this process: one thread per BLAS / OpenMP pool, so that
# "one worker" means one core and the single-threaded baselines are single-threaded.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import sys  # noqa: E402

_NUMPY_IMPORTED_EARLY = "numpy" in sys.modules  # then the settings above may have come too late for it

import functools  # noqa: E402
import json  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import harness  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402
import workloads  # noqa: E402
from harness import BENCH_DIR, RESULTS, RESULTS_DIR, SHM_DIR, Results, Row, children, own_segments  # noqa: E402

RESULTS.numpy_imported_early = _NUMPY_IMPORTED_EARLY
# How long a closed system's processes may take to exit before they count as left behind.
EXIT_GRACE_S = 10.0
# Per-test limit, above the project's 60 s for tests: one full measurement (torch spawning) may take longer.
BENCH_TIMEOUT_S = 120 if workloads.QUICK else 600
# The report's file names in bench/results: a partial run (``BENCH_RESULTS_NAME=ray pytest bench/test_ray.py``)
# writes its own instead of replacing the full suite's latest.md.
RESULTS_NAME = os.environ.get("BENCH_RESULTS_NAME") or "latest"


@pytest.fixture(scope="session")
def results() -> Results:
    """The session's results collector (written out and printed at the end of the session)."""
    return RESULTS


@pytest.fixture
def measure(benchmark: Any, results: Results) -> Callable[..., Row]:
    """``measure(stream, workload, system, workers, variant=, extra=)``: ``harness.measure`` with this test's
    ``benchmark`` fixture and the session's collector."""
    return functools.partial(harness.measure, benchmark, results)


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Fail a benchmark that leaves a child process or a shared-memory segment behind (and clean it up)."""
    before = {p.pid for p in children()}
    before_segments = set(own_segments())
    yield
    new = [p for p in children() if p.pid not in before]
    _, alive = psutil.wait_procs(new, timeout=EXIT_GRACE_S)
    for process in alive:
        process.kill()
    leaked = set(own_segments()) - before_segments
    for name in leaked:
        os.unlink(os.path.join(SHM_DIR, name))
    assert not alive, f"child processes left running: {[p.pid for p in alive]}"
    assert not leaked, f"shared-memory segments left in {SHM_DIR}: {sorted(leaked)}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Benchmarks get a longer time limit than the project's tests (unless they set their own: the end-to-end
    comparisons, whose length grows with their rounds)."""
    for item in items:
        if BENCH_DIR in Path(str(item.path)).resolve().parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(BENCH_TIMEOUT_S))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write ``bench/results/latest.md`` and ``latest.json`` (nothing when no benchmark ran)."""
    if RESULTS.empty():
        return
    RESULTS_DIR.mkdir(exist_ok=True)
    name = RESULTS_NAME
    (RESULTS_DIR / f"{name}.md").write_text(harness.render_markdown(RESULTS))
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(harness.render_json(RESULTS), indent=1, default=str) + "\n")
    if name == "latest":
        harness.render_plot(RESULTS, RESULTS_DIR / "throughput.png")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print the tables at the end of the run."""
    if RESULTS.empty():
        return
    terminalreporter.write_sep("=", "prefetch benchmark summary")
    for line in harness.render_markdown(RESULTS).splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"(also in {RESULTS_DIR / (RESULTS_NAME + '.md')} and {RESULTS_NAME}.json)")


_PROGRESS: dict[str, Any] = {"done": 0, "total": 0, "started": None}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Remember how many benchmarks there are, for the progress line."""
    _PROGRESS["total"] = len(session.items)


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    """A progress line per benchmark on long runs: how many are done, time so far, and an estimate of the rest."""
    import time

    if _PROGRESS["started"] is None:
        _PROGRESS["started"] = time.monotonic()
    done, total = _PROGRESS["done"], _PROGRESS["total"]
    elapsed = time.monotonic() - _PROGRESS["started"]
    eta = f", about {elapsed / done * (total - done):.0f} s left" if done else ""
    sys.stderr.write(f"\r[bench {done + 1}/{total}, {elapsed:.0f} s{eta}] {nodeid[-60:]:<60}")
    sys.stderr.flush()
    _PROGRESS["done"] = done + 1
