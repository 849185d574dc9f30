"""End to end: training runs fed by the plain generator, PyTorch DataLoader and prefetch, side by side.

What users measure is their training loop, whose step uses the same cores as the workers. Each case here is
a comparison run in this session: every system's training run in a fresh process (``e2e.run_in_fresh_process``),
interleaved round after round (``BENCH_ROUNDS``, default 5; 1 with ``BENCH_QUICK=1``) so that drift on a shared
machine hits them all alike; the figures are medians and ranges over the rounds, and the ratios are paired: each
system against a reference in the same round, every round's ratio listed and their median (``e2e_figures``).

"""

from __future__ import annotations

import importlib.util
import os
import statistics
from typing import Any

import e2e
import e2e_figures
import pytest
from harness import Results

ROUNDS = e2e_figures.bench_rounds()
pytestmark = pytest.mark.timeout(e2e.comparison_timeout_s(ROUNDS))
HAS_TORCH = importlib.util.find_spec("torch") is not None
# DataLoader's documented default, and the counts its best is picked from (1 to the cores + 1):
# ``BENCH_DATALOADER_WORKERS=2`` (a comma list) runs fewer, as ``target_runs.py`` does.
DATALOADER_DEFAULT = 0
TARGET_DATALOADER = 2  # the reference: DataLoader(num_workers=2)


def dataloader_counts() -> list[int]:
    listed = os.environ.get("BENCH_DATALOADER_WORKERS")
    if listed:
        return [int(n) for n in listed.split(",")]
    return [DATALOADER_DEFAULT, *range(1, len(os.sched_getaffinity(0)) + 2)]


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


def dataloader_label(workers: int) -> str:
    return f"DataLoader(num_workers={workers})"


STEP_LABELS = {
    "none": "none (loader alone)",
    "default": "torch default threads",
    "1": "1 thread",
    "tiny": "one linear layer (data-bound)",
}


def _jpeg_cases(step: str, counts: list[int]) -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {"plain": {"workload": "jpeg", "system": "plain", "step": step}}
    for workers in counts:
        cases[dataloader_label(workers)] = {"workload": "jpeg", "system": "torch", "step": step, "workers": workers}
    cases["prefetch"] = {"workload": "jpeg", "system": "prefetch", "step": step, "workers": -1}  # -1: defaults
    _add_baseline(cases, "prefetch")
    return cases


def _jpeg_report(results: Results, section: str, step: str, runs: dict[str, list[dict[str, Any]]]) -> None:
    """One row per system: images/s, paired per-round ratios against plain, DataLoader(num_workers=2) and the
    best DataLoader of the run (highest median), batches before steady state, CPU."""
    loaders = [label for label in runs if label.startswith("DataLoader")]
    best = max(loaders, key=lambda label: _median(runs[label], "images_per_s")) if len(loaders) > 1 else None
    references = {"plain": runs["plain"]}
    if dataloader_label(TARGET_DATALOADER) in runs:
        references["DataLoader(2)"] = runs[dataloader_label(TARGET_DATALOADER)]
    if best is not None:
        references["best DataLoader"] = runs[best]
    for system, system_runs in runs.items():
        loop, others = _cores(system_runs)
        marks = [
            m
            for m, hit in (("default", system == dataloader_label(DATALOADER_DEFAULT)), ("best", system == best))
            if hit
        ]
        results.add_table_row(
            section,
            {
                "system": system + (f" ({', '.join(marks)})" if marks else ""),
                "training step": STEP_LABELS[step],
                "images/s (median)": round(_median(system_runs, "images_per_s"), 1),
                "min-max": _span(system_runs, "images_per_s", 1),
                **e2e_figures.comparison_cells(system_runs, references, "images_per_s"),
                "first batch s": round(_median(system_runs, "first_batch_s"), 3),
                "loop cores": round(loop, 2),
                "worker cores": round(others, 2),
                "rounds": len(system_runs),
            },
        )


@pytest.mark.parametrize("step", ["none", "default", "1"])
def test_jpeg_training(benchmark: Any, results: Results, step: str) -> None:
    """JPEG files -> decode, RandomResizedCrop(224), flip -> batches of 64, into a CPU-bound torch step.

    Why: the ImageNet-style pipeline where loading and the training step both need the 2 cores (the
    compute-bound loop). Target at torch's default threads: prefetch (all defaults) >= 1.3x the plain generator
    and >= 1.05x DataLoader(num_workers=2), paired per round. There DataLoader also runs at its documented
    default (num_workers=0) and at 1 to the cores + 1 workers, the best of which is marked; at 1 thread and
    with no step, DataLoader runs at num_workers=2 only.
    """
    _need("PIL", "torch")
    cases = _jpeg_cases(step, dataloader_counts() if step == "default" else [TARGET_DATALOADER])
    e2e.write_jpegs()
    runs = benchmark.pedantic(e2e.compare, args=(cases, ROUNDS), rounds=1, iterations=1)
    results.runs[f"jpeg step={step}"] = runs
    _jpeg_report(results, "e2e-jpeg", step, runs)
    benchmark.extra_info.update(
        {f"{system}_images_per_s": _median(r, "images_per_s") for system, r in runs.items()}, step=step
    )
    assert all(len(r) == ROUNDS for r in runs.values())


def test_jpeg_data_bound(benchmark: Any, results: Results) -> None:
    """The data-bound loop: the same JPEG pipeline into a step of a few ms (one linear layer on pooled images).

    Why: where preprocessing is the whole cost, more workers are the whole gain; the plain generator, DataLoader
    at its documented default (num_workers=0, in the loop) and at each count from 1 to the cores + 1 (the best
    marked), and prefetch at its defaults.
    """
    _need("PIL", "torch")
    cases = _jpeg_cases("tiny", dataloader_counts())
    e2e.write_jpegs()
    runs = benchmark.pedantic(e2e.compare, args=(cases, ROUNDS), rounds=1, iterations=1)
    results.runs["jpeg step=tiny"] = runs
    _jpeg_report(results, "e2e-data-bound", "tiny", runs)
    benchmark.extra_info.update({f"{system}_images_per_s": _median(r, "images_per_s") for system, r in runs.items()})
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
    results.runs[f"keras threads={threads}"] = runs
    for system, system_runs in runs.items():
        results.add_table_row(
            "e2e-keras",
            {
                "system": system,
                "training threads": "torch default" if threads == "default" else threads,
                "s per epoch (median)": round(_median(system_runs, "s_per_epoch"), 3),
                "min-max": _span(system_runs, "s_per_epoch", 3),
                # epochs per second against plain's: > 1 is faster
                **e2e_figures.comparison_cells(system_runs, {"plain": runs["plain"]}, "s_per_epoch", invert=True),
                "rounds": len(system_runs),
            },
        )
    benchmark.extra_info.update({f"{system}_s_per_epoch": _median(r, "s_per_epoch") for system, r in runs.items()})
    assert all(len(r) == ROUNDS for r in runs.values())
