"""End to end: training runs fed by the plain generator, PyTorch DataLoader and prefetch, side by side.

What users measure is their training loop, whose step uses the same cores as the workers. Each case here is
a comparison run in this session: every system's training run in a fresh process (``e2e.run_in_fresh_process``),
interleaved round after round so that drift on a shared machine hits them all alike; the figures are medians
and ranges over the rounds, and the ratios are taken between medians of the same session.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
from typing import Any

import e2e
import pytest
import workloads
from harness import Results

ROUNDS = 1 if workloads.QUICK else 3
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _need(*modules: str) -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")  # Keras 3 picks its backend at import
    for module in modules:
        pytest.importorskip(module)


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def _span(runs: list[dict[str, Any]], key: str, digits: int) -> str:
    values = [run[key] for run in runs]
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def _cores(runs: list[dict[str, Any]]) -> tuple[float, float]:
    loop = statistics.median(run["consumer_cores"] for run in runs)
    others = statistics.median(sum(run["other_cores"]) for run in runs)
    return loop, others


def _add_baseline(cases: dict[str, dict[str, Any]], system: str) -> None:
    """With ``BENCH_BASELINE_TREE`` set, the same case run by that checkout's code, as "<system> (baseline)"."""
    tree = e2e.baseline_tree()
    if tree is not None:
        cases[f"{system} (baseline)"] = {**cases[system], "tree": tree}


STEP_LABELS = {"none": "none (loader alone)", "default": "torch default threads", "1": "1 thread"}


@pytest.mark.parametrize("step", ["none", "default", "1"])
def test_jpeg_training(benchmark: Any, results: Results, step: str) -> None:
    """JPEG files -> decode, RandomResizedCrop(224), flip -> batches of 64, into a CPU-bound torch step.

    Why: the ImageNet-style pipeline where loading and the training step both need the 2 cores. prefetch
    (all defaults, 2 workers) must beat the plain generator and DataLoader(num_workers=2) at the framework's
    default threads and at 1 thread, and be at least DataLoader's speed with no step at all.
    """
    _need("PIL", "torch")
    cases = {
        "plain": {"workload": "jpeg", "system": "plain", "step": step},
        "torch": {"workload": "jpeg", "system": "torch", "step": step, "workers": 2},
        "prefetch": {"workload": "jpeg", "system": "prefetch", "step": step, "workers": -1},  # -1: default workers
    }
    _add_baseline(cases, "prefetch")
    e2e.write_jpegs()
    runs = benchmark.pedantic(e2e.compare, args=(cases, ROUNDS), rounds=1, iterations=1)
    plain, torch = _median(runs["plain"], "images_per_s"), _median(runs["torch"], "images_per_s")
    for system, system_runs in runs.items():
        rate = _median(system_runs, "images_per_s")
        loop, others = _cores(system_runs)
        results.add_table_row(
            "e2e-jpeg",
            {
                "system": system,
                "training step": STEP_LABELS[step],
                "images/s (median)": round(rate, 1),
                "min-max": _span(system_runs, "images_per_s", 1),
                "vs plain": f"{rate / plain:.2f}x",
                "vs DataLoader": f"{rate / torch:.2f}x",
                "paired vs plain": f"{e2e.paired_ratio(system_runs, runs['plain'], 'images_per_s'):.2f}x",
                "paired vs DataLoader": f"{e2e.paired_ratio(system_runs, runs['torch'], 'images_per_s'):.2f}x",
                "first batch s": round(_median(system_runs, "first_batch_s"), 3),
                "loop cores": round(loop, 2),
                "worker cores": round(others, 2),
                "rounds": len(system_runs),
            },
        )
    benchmark.extra_info.update(
        {f"{system}_images_per_s": _median(r, "images_per_s") for system, r in runs.items()}, step=step
    )
    assert all(len(r) == ROUNDS for r in runs.values())


@pytest.mark.parametrize("threads", ["default", "1"])
def test_keras_fit(benchmark: Any, results: Results, threads: str) -> None:
    """Keras ``fit`` (torch backend, all defaults) on the seed's use case: plain generator vs ``data_generator``.

    Why: the seed's own workflow. With default settings everywhere ``data_generator`` must make the epochs at
    least 1.3x faster than the plain generator, and at 1 training thread never slower.
    """
    _need("torch", "keras")
    cases = {
        "plain": {"workload": "keras", "system": "plain", "threads": threads},
        "prefetch": {"workload": "keras", "system": "prefetch", "threads": threads},
    }
    _add_baseline(cases, "prefetch")
    runs = benchmark.pedantic(e2e.compare, args=(cases, ROUNDS), rounds=1, iterations=1)
    plain = _median(runs["plain"], "s_per_epoch")
    for system, system_runs in runs.items():
        seconds = _median(system_runs, "s_per_epoch")
        results.add_table_row(
            "e2e-keras",
            {
                "system": system,
                "training threads": "torch default" if threads == "default" else threads,
                "s per epoch (median)": round(seconds, 3),
                "min-max": _span(system_runs, "s_per_epoch", 3),
                "epochs/s vs plain": f"{plain / seconds:.2f}x",
                "paired vs plain": f"{1 / e2e.paired_ratio(system_runs, runs['plain'], 's_per_epoch'):.2f}x",
                "rounds": len(system_runs),
            },
        )
    benchmark.extra_info.update({f"{system}_s_per_epoch": _median(r, "s_per_epoch") for system, r in runs.items()})
    assert all(len(r) == ROUNDS for r in runs.values())
