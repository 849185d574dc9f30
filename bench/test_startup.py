"""Start-up costs: ``import prefetch``, and how long a fresh script waits for its first batch.

Every round runs in a fresh Python process, as a user's script would: nothing is imported or cached yet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from harness import BENCH_DIR, SHM_DIR, Results, Row
from workloads import STARTUP_ROUNDS

# A subprocess that takes longer than this has hung (a spawn start of torch takes a few seconds).
SUBPROCESS_TIMEOUT_S = 180

IMPORT_SNIPPET = "import time;t=time.perf_counter();import {module};print(time.perf_counter()-t)"

# Run as a file (not ``-c``) so that spawned workers can re-import it as ``__mp_main__``.
FIRST_BATCH_SCRIPT = """\
import json
import os
import sys
import time

sys.path.insert(0, {bench_dir!r})

import workloads


def main() -> None:
    system, start_method, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if system == "torch":
        import torch  # a torch user has imported it already: not part of the start-up measured
    else:
        import prefetch  # its lazy imports (multiprocess, at the first batch) are part of it
    workload = workloads.WORKLOADS["overhead"]
    workload.data()
    started = time.perf_counter()
    with workloads.open_stream(system, workload, workers, start_method=start_method) as stream:
        batch = next(stream.batches)
        first = time.perf_counter()
        workload.check(batch)
        del batch
    closed = time.perf_counter()
    print(json.dumps({{"first_batch_s": first - started, "close_s": closed - first, "pid": os.getpid()}}))


if __name__ == "__main__":
    main()
"""


def _python(*args: str) -> str:
    """Run a fresh interpreter of this venv (same environment: thread settings, calibration) and return its
    standard output."""
    done = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        env=os.environ.copy(),
        cwd=BENCH_DIR.parent,
    )
    if done.returncode != 0:
        raise AssertionError(f"{args} failed with exit code {done.returncode}:\n{done.stderr}")
    return done.stdout


@pytest.mark.parametrize("module", ["numpy", "prefetch"])
def test_import_time(benchmark: Any, results: Results, module: str) -> None:
    """Seconds of ``import prefetch`` in a fresh interpreter (``import numpy`` alone for reference).

    Why: every user script and every spawned worker pays it. prefetch defers its heavy imports
    (multiprocess, dill, psutil) to the first batch, so it should cost little more than numpy.
    """
    seconds: list[float] = []

    def once() -> None:
        seconds.append(float(_python("-c", IMPORT_SNIPPET.format(module=module)).split()[-1]))

    benchmark.group = "startup"
    benchmark.pedantic(once, rounds=STARTUP_ROUNDS, iterations=1, warmup_rounds=0)
    results.add(Row("startup", module, None, "s", seconds, variant=f"import {module}"))


@pytest.mark.parametrize(
    ("system", "start_method", "workers"),
    [
        (system, start_method, workers)
        for system in ("prefetch", "torch")
        for start_method, workers in (("fork", 2), ("fork", 8), ("spawn", 2), ("spawn", 4), ("spawn", 8))
    ],
)
def test_first_batch(
    benchmark: Any, results: Results, tmp_path: Path, system: str, start_method: str, workers: int
) -> None:
    """Seconds from constructing a loader to holding its first batch, and from there to a finished close.

    Why: a short job, a notebook cell or a test suite pays start-up every time, and ``spawn`` (the default on
    macOS and Windows) starts every worker from scratch. torch DataLoader with the same settings for
    comparison. Fork and spawn with 2 and 8 workers, and spawn with 4 (the figure the engine issue sets a
    target for).
    """
    if system == "torch":
        pytest.importorskip("torch")
    script = tmp_path / "first_batch.py"
    script.write_text(FIRST_BATCH_SCRIPT.format(bench_dir=str(BENCH_DIR)))
    first: list[float] = []
    close: list[float] = []

    def once() -> None:
        figures = json.loads(_python(str(script), system, start_method, str(workers)).splitlines()[-1])
        first.append(figures["first_batch_s"])
        close.append(figures["close_s"])
        left = [name for name in os.listdir(SHM_DIR) if name.startswith(f"prefetch-{figures['pid']}-")]
        assert not left, f"the script left shared-memory segments behind: {left}"

    benchmark.group = "startup"
    benchmark.pedantic(once, rounds=STARTUP_ROUNDS, iterations=1, warmup_rounds=0)
    setting = f"{start_method}, {workers} workers"
    results.add(Row("startup", system, workers, "s", first, variant=f"first batch, {setting}"))
    results.add(Row("startup", system, workers, "s", close, variant=f"close, {setting}"))
