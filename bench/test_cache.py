"""Decode once: the JPEG pipeline split into ``load`` (decode + a fixed resize) and ``transform`` (crop, flip),
without a cache and with ``cache="memory"`` and ``cache=<dir>``, measured after two epochs (every timed batch
of a cached run reads the cache).

Each run is a fresh process (``e2e.run_in_fresh_process``), the systems interleaved round after round, as in
``test_e2e.py``. Its warm-up (``e2e.JPEG_WARMUP_BATCHES``, 120 batches of 64 over 1280 files) covers six epochs, so
the timed batches are epochs 7 and 8.
"""

from __future__ import annotations

import statistics
from typing import Any

import e2e
import pytest
import workloads
from harness import Results

ROUNDS = 1 if workloads.QUICK else 3
pytestmark = pytest.mark.timeout(e2e.comparison_timeout_s(ROUNDS))
# Issue 21.5: with the cache, epochs 2+ of the loader alone at least this many times the split pipeline's rate.
CACHE_SPEEDUP_TARGET = 2.5
STEP_LABELS = {"none": "none (loader alone)", "default": "torch default threads"}


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def _report(results: Results, section: str, step: str, runs: dict[str, list[dict[str, Any]]], base: str) -> None:
    base_rate = _median(runs[base], "images_per_s")
    for system, system_runs in runs.items():
        rate = _median(system_runs, "images_per_s")
        values = [run["images_per_s"] for run in system_runs]
        results.add_table_row(
            section,
            {
                "system": system,
                "training step": STEP_LABELS[step],
                "images/s (median)": round(rate, 1),
                "min-max": f"{min(values):.1f}-{max(values):.1f}",
                f"vs {base}": f"{rate / base_rate:.2f}x",
                f"paired vs {base}": f"{e2e.paired_ratio(system_runs, runs[base], 'images_per_s'):.2f}x",
                "target": f">= {CACHE_SPEEDUP_TARGET}x" if "cache" in system and step == "none" else "report",
                "first batch s": round(_median(system_runs, "first_batch_s"), 3),
                "rounds": len(system_runs),
            },
        )


def test_jpeg_pipeline_cached(benchmark: Any, results: Results) -> None:
    """The loader alone (no training step): decode once, then crop and flip per epoch.

    Why: issue 21.5's target. Decoding is most of the JPEG pipeline's work and the same every epoch; with the
    cache, epochs 2+ must deliver at least 2.5x the images/s of the same split pipeline without it."""
    pytest.importorskip("PIL")
    systems = ["prefetch-split", "prefetch-cache-memory", "prefetch-cache-dir"]
    if workloads.QUICK:  # a smoke run: within the quick per-test limit on a busy machine
        systems = systems[:2]
    cases = {system: {"workload": "jpeg", "system": system, "step": "none", "workers": -1} for system in systems}
    e2e.write_jpegs()
    runs = benchmark.pedantic(e2e.compare, args=(cases, ROUNDS), rounds=1, iterations=1)
    _report(results, "cache-jpeg", "none", runs, "prefetch-split")
    benchmark.extra_info.update({f"{system}_images_per_s": _median(r, "images_per_s") for system, r in runs.items()})
    assert all(len(r) == ROUNDS for r in runs.values())


def test_jpeg_training_cached(benchmark: Any, results: Results) -> None:
    """The same pipelines feeding the CPU-bound torch step of ``test_e2e.py`` at torch's default threads, beside
    the plain generator and prefetch running the whole augmentation per epoch (``jpeg_augment``): reported.

    Why: what a training run gains from the cache once the step shares the cores with the workers."""
    pytest.importorskip("PIL")
    pytest.importorskip("torch")
    systems = ["plain", "prefetch", "prefetch-split", "prefetch-cache-memory"]
    if workloads.QUICK:  # a smoke run: the cached system only, within the quick per-test limit on a busy machine
        systems = ["prefetch-cache-memory"]
    cases = {
        system: {
            "workload": "jpeg",
            "system": system,
            "step": "default",
            **({} if system == "plain" else {"workers": -1}),
        }
        for system in systems
    }
    e2e.write_jpegs()
    runs = benchmark.pedantic(e2e.compare, args=(cases, ROUNDS), rounds=1, iterations=1)
    _report(results, "cache-jpeg-training", "default", runs, systems[0])
    benchmark.extra_info.update({f"{system}_images_per_s": _median(r, "images_per_s") for system, r in runs.items()})
    assert all(len(r) == ROUNDS for r in runs.values())
