"""The order at any size: seconds to the first batch and peak memory for 10^3, 10^8 and 10^10 samples.

A source that reports a huge ``len`` and makes each sample on demand (4 int64s: its index) holds no data, so
what grows with ``n`` is the order alone. prefetch evaluates its order per batch (docs/design.md, "Order and
determinism"); torch ``DataLoader``'s ``RandomSampler`` draws ``randperm(n).tolist()`` before the first batch;
grain's ``IndexSampler`` shuffles per index, like prefetch. Every case runs in a fresh interpreter under an
address-space limit (``RLIMIT_AS``, ``ORDER_BENCH_LIMIT_GIB``, default 8) and a timeout, so an order that does not
fit fails there -- reported with its error, not hidden -- instead of taking the machine's memory.

grain is measured when it imports here, or in the interpreter ``BENCH_GRAIN_PYTHON`` names (a venv with
``pip install grain``, which needs no JAX for this); otherwise its rows say why not.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from harness import BENCH_DIR, Results
from workloads import QUICK

SIZES = (10**3, 10**5, 10**10) if QUICK else (10**3, 10**8, 10**10)
ROUNDS = 1 if QUICK else 3
# What one case may take: torch's randperm(10^8).tolist() takes ~10-20 s; a case past this has hung.
CASE_TIMEOUT_S = 60 if QUICK else 180
LIMIT_BYTES = int(float(os.environ.get("ORDER_BENCH_LIMIT_GIB", "8")) * 2**30)
MIB = 2**20
# The report's columns, every row with all of them (a row that failed or was not run leaves them empty).
COLUMNS = (
    "first batch s (median)",
    "min-max s",
    "peak RSS added, MiB (median)",
    "children's peak RSS, MiB",
    "s more than at 10^3",
    "MiB more than at 10^3",
    "rounds",
)

# (system, workers, label): prefetch in-process and with 2 forked workers (the order then lives in the
# coordinator), the block order, torch and grain in-process.
CASES = [
    ("prefetch", 0, "prefetch, workers=0"),
    ("prefetch", 2, "prefetch, workers=2 (fork)"),
    ("prefetch-block", 0, 'prefetch, shuffle="block", workers=0'),
    ("torch", 0, "torch DataLoader (RandomSampler), num_workers=0"),
    ("grain", 0, "grain DataLoader (IndexSampler), worker_count=0"),
]

# Run as a file, so that forked workers find ``Huge`` in ``__main__``.
SCRIPT = """\
import json
import os
import resource
import sys
import time

resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))  # before anything allocates: the whole process

import numpy as np


class Huge:
    \"\"\"n samples, none stored: sample i is four int64s equal to i.\"\"\"

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full(4, i, dtype=np.int64)


def rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak():  # the process's peak RSS (VmHWM) starts again from its RSS now (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_bytes():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def first_batch(system, n, workers):
    source = Huge(n)
    if system.startswith("prefetch"):
        import prefetch

        shuffle = "block" if system == "prefetch-block" else True
        options = dict(batch_size=32, shuffle=shuffle, seed=0, workers=workers)
        if workers:
            options["start_method"] = "fork"
        with prefetch.Loader(source, **options) as loader:
            batch = next(iter(loader))
            return time.perf_counter(), batch
    if system == "torch":
        from torch.utils.data import DataLoader

        loader = DataLoader(source, batch_size=32, shuffle=True, num_workers=0)
        batch = next(iter(loader))
        return time.perf_counter(), batch
    import grain.python as grain

    sampler = grain.IndexSampler(num_records=n, shard_options=grain.NoSharding(), shuffle=True, num_epochs=1, seed=0)
    loader = grain.DataLoader(data_source=source, sampler=sampler, operations=[grain.Batch(32)], worker_count=0)
    batch = next(iter(loader))
    return time.perf_counter(), batch


def main():
    system, n, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    # A first loader of 10 samples pays the imports and first-use allocations (prefetch imports multiprocess and
    # dill at its first batch): what is measured next is what the size of the data adds.
    first_batch(system, 10, workers)
    reset_peak()
    figures = {{"rss_before": rss_bytes()}}
    started = time.perf_counter()
    try:
        got, batch = first_batch(system, n, workers)
        figures["first_batch_s"] = got - started
        figures["shape"] = list(batch.shape)
    except BaseException as exc:  # MemoryError, torch's allocator error: the report says which
        figures["error"] = f"{{type(exc).__name__}}: {{str(exc)[:160]}}"
        figures["failed_after_s"] = time.perf_counter() - started
    figures["peak_rss"] = peak_bytes()
    figures["children_peak_rss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
"""


def _interpreter(system: str) -> tuple[str | None, str]:
    """The Python that runs ``system``'s case, or None and why it cannot run here."""
    if system != "grain":
        return sys.executable, ""
    candidates = [sys.executable, os.environ.get("BENCH_GRAIN_PYTHON", "")]
    for python in filter(None, candidates):
        probe = subprocess.run([python, "-c", "import grain.python"], capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            return python, ""
    return None, "grain does not import here: pip install grain, or point BENCH_GRAIN_PYTHON at a venv that has it"


def _run_case(script: Path, python: str, system: str, n: int, workers: int) -> dict[str, Any]:
    """One fresh interpreter's figures, or an ``error`` when it died or ran out of time (killed, with its children)."""
    process = subprocess.Popen(
        [python, str(script), system, str(n), str(workers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),  # the session's prefetch (as test_startup): an installed one, or PYTHONPATH's
        cwd=BENCH_DIR.parent,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=CASE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"error": f"no first batch within {CASE_TIMEOUT_S} s (killed)"}
    if process.returncode != 0:
        last = err.strip().splitlines()[-1:] or [""]
        return {"error": f"exit code {process.returncode}: {last[0][:160]}"}
    return json.loads(out.strip().splitlines()[-1])


def _exponent(n: int) -> str:
    return f"10^{len(str(n)) - 1}"


@pytest.mark.parametrize("n", SIZES, ids=_exponent)
@pytest.mark.parametrize(("system", "workers", "label"), CASES, ids=[case[2] for case in CASES])
def test_first_batch_at_any_size(
    benchmark: Any, results: Results, tmp_path: Path, system: str, workers: int, label: str, n: int
) -> None:
    """Seconds from constructing the loader to holding its first batch, and the peak RSS it added, at ``n``.

    Why: the contract says the order costs O(1) memory in ``n`` -- a source of 10^10 samples starts as fast as
    one of 10^3 (target: within 1 s and 64 MiB of it). torch and grain for comparison; a case that fails under
    the address-space limit is a row with its error.
    """
    if system == "torch":
        pytest.importorskip("torch")
    python, why_not = _interpreter(system)
    row: dict[str, Any] = {"system": label, "n": _exponent(n), **dict.fromkeys(COLUMNS)}
    if python is None:
        results.add_table_row("order", {**row, "result": why_not})
        pytest.skip(why_not)
    script = tmp_path / "first_batch.py"
    script.write_text(SCRIPT.format(limit=LIMIT_BYTES))
    rounds: list[dict[str, Any]] = []

    def once() -> None:
        if not rounds or "error" not in rounds[-1]:  # after a failure the rest of the rounds would fail alike
            rounds.append(_run_case(script, python, system, n, workers))

    benchmark.group = "order"
    benchmark.pedantic(once, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    failed = next((r for r in rounds if "error" in r), None)
    if failed is not None:
        after = f" after {failed['failed_after_s']:.1f} s" if "failed_after_s" in failed else ""
        peak = f", peak RSS {failed['peak_rss'] / MIB:.0f} MiB" if "peak_rss" in failed else ""
        results.add_table_row("order", {**row, "result": f"failed{after}{peak}: {failed['error']}"})
        assert not system.startswith("prefetch") and system != "grain", failed  # these must start at any size
        return
    assert all(r["shape"] == [32, 4] for r in rounds), rounds
    seconds = [r["first_batch_s"] for r in rounds]
    growth = [(r["peak_rss"] - r["rss_before"]) / MIB for r in rounds]
    figures = {
        "first batch s (median)": round(statistics.median(seconds), 4),
        "min-max s": f"{min(seconds):.4f}-{max(seconds):.4f}",
        "peak RSS added, MiB (median)": round(statistics.median(growth), 1),
        "children's peak RSS, MiB": round(max(r["children_peak_rss"] for r in rounds) / MIB, 1) if workers else None,
        "rounds": len(rounds),
    }
    small = next((t for t in results.tables.get("order", []) if t["system"] == label and t["n"] == "10^3"), None)
    if small is not None and small["first batch s (median)"] is not None and n != SIZES[0]:
        figures["s more than at 10^3"] = round(figures["first batch s (median)"] - small["first batch s (median)"], 4)
        figures["MiB more than at 10^3"] = round(
            figures["peak RSS added, MiB (median)"] - small["peak RSS added, MiB (median)"], 1
        )
    results.add_table_row("order", {**row, **figures, "result": "ok"})
