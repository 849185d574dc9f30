"""``workers="auto"`` against every fixed count 1 .. budget, on the end-to-end JPEG training (``e2e.py``).

Why: ``"auto"`` is the default because it wins or ties on every end-to-end workload. The target: within
5 % of the best fixed count, settled within 300 batches. Each system's run is a fresh process
(``e2e.run_in_fresh_process``), the systems interleaved round after round (``BENCH_AUTO_ROUNDS``, at least 5
unless ``BENCH_QUICK=1``); every run first takes ``BENCH_AUTO_WARMUP`` batches (default 300: what ``"auto"``
is allowed to settle in), then times ``BENCH_AUTO_TIMED`` more. The table gives each system's median rate,
its paired per-round ratio to the best fixed count (``e2e.paired_ratio``) and, for ``"auto"``, the batch of
its last change (from ``stats().auto_changes``: the loop's batches when it last moved), where it ended, and
the batch at which any of prefetch's decisions last moved (``stats().decisions``: a park timed and not kept,
the thread tuner's verdicts).
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import e2e
import pytest
import workloads
from harness import Results

from prefetch import _budget

ROUNDS = 1 if workloads.QUICK else max(5, int(os.environ.get("BENCH_AUTO_ROUNDS", "5")))
WARMUP_BATCHES = 4 if workloads.QUICK else int(os.environ.get("BENCH_AUTO_WARMUP", "300"))
TIMED_BATCHES = 4 if workloads.QUICK else int(os.environ.get("BENCH_AUTO_TIMED", "60"))
# Longer than the suite's per-test limit: every fixed count and "auto", each round (see e2e.py).
pytestmark = pytest.mark.timeout(e2e.comparison_timeout_s(ROUNDS))
STEP_LABELS = {
    "none": "none (loader alone)",
    "default": "torch default threads",
    "1": "1 thread",
    "keras": "Keras fit (digits)",
}


def _systems(step: str) -> dict[str, dict[str, Any]]:
    """``"auto"`` and each fixed count up to the budget (the default ``workers``), as e2e cases (``run_jpeg``)."""
    base = {"workload": "jpeg", "system": "prefetch", "step": step}
    base.update(warmup_batches=WARMUP_BATCHES, timed_batches=TIMED_BATCHES)
    cases = {"auto": {**base, "auto": True}}
    for count in range(1, _budget.cpu_budget().cpus + 1):
        cases[f"workers={count}"] = {**base, "workers": count}
    return cases


def _keras_systems() -> dict[str, dict[str, Any]]:
    """The same for Keras ``fit`` on the digits (``e2e_keras.run_keras``: its whole run is timed, tuning included)."""
    base = {"workload": "keras", "system": "prefetch", "threads": "default"}
    cases = {"auto": {**base, "workers": "auto"}}
    for count in range(1, _budget.cpu_budget().cpus + 1):
        cases[f"workers={count}"] = {**base, "workers": count}
    return cases


@pytest.mark.parametrize("step", ["none", "default", "1", "keras"])
def test_auto_against_every_fixed_count(benchmark: Any, results: Results, step: str) -> None:
    pytest.importorskip("PIL")
    if step != "none":
        pytest.importorskip("torch")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    if step == "keras":
        pytest.importorskip("keras")
        cases, key = _keras_systems(), "s_per_epoch"
    else:
        cases, key = _systems(step), "images_per_s"
        e2e.write_jpegs()
    runs = benchmark.pedantic(e2e.compare, args=(cases, ROUNDS), rounds=1, iterations=1)
    results.runs[f"auto step={step}"] = runs  # every round of every system, in the JSON report
    fixed = {label: r for label, r in runs.items() if label != "auto"}
    sign = 1 if key == "images_per_s" else -1  # seconds per epoch: less is faster
    best = max(fixed, key=lambda label: sign * statistics.median(run[key] for run in fixed[label]))
    for label, system_runs in runs.items():
        settled = [run["auto_changes"][-1][0] if run.get("auto_changes") else 0 for run in system_runs]
        ended = [tuple(run["auto_changes"][-1][1:]) if run.get("auto_changes") else "unchanged" for run in system_runs]
        results.add_table_row(
            "auto-vs-fixed",
            {
                "system": label,
                "training step": STEP_LABELS[step],
                "figure (median)": f"{statistics.median(run[key] for run in system_runs):.3g} {key}",
                "paired vs best fixed": f"{_paired(system_runs, runs[best], key):.3f}x",
                "per round": " ".join(f"{_paired([a], [b], key):.2f}" for a, b in zip(system_runs, runs[best])),
                "best fixed": best,
                "last change at batch (max)": max(settled) if label == "auto" else "",
                # any decision's last move, a park measured and not kept included (no change is listed for it)
                "decided at batch (max)": max(run.get("decided_at_batch", 0) for run in system_runs),
                "ended at (workers, window)": str(ended) if label == "auto" else "",
                "rounds": len(system_runs),
            },
        )
    assert all(len(r) == ROUNDS for r in runs.values())


def _paired(runs: list[dict[str, Any]], best: list[dict[str, Any]], key: str) -> float:
    """The median of the per-round ratios, > 1 when ``runs`` is faster (``e2e.paired_ratio``; for seconds per
    epoch, its inverse)."""
    ratio = e2e.paired_ratio(runs, best, key)
    return ratio if key == "images_per_s" else 1.0 / ratio
