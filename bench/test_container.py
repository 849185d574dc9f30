"""End to end in a 1-CPU container (issue 20's "container" target): the JPEG pipeline with every run confined to
one CPU by a cgroup CPU quota (``container.one_cpu``; ``taskset`` when cgroups are not writable).

Why: a container limited by a CPU quota on a many-core host still lists all the host's cores in its affinity mask;
defaults read from the mask alone start a worker per host core, which the quota then throttles together with the
training step. Here the machine has its cores, and the runs one CPU of time. Target: prefetch at all its defaults
starts 1 worker and is never slower than the plain generator (paired per-round ratio >= 1); DataLoader is shown at
its documented default (``num_workers=0``: in the loop, like the plain generator) and at ``num_workers=1``.
Conventions of ``e2e.py``: each run a fresh process, the systems interleaved round after round (``BENCH_ROUNDS``,
default 5), medians, ranges, paired per-round ratios (each round's listed) and batches before steady state.
"""

from __future__ import annotations

import statistics
from typing import Any

import e2e
import e2e_figures
import pytest
from container import one_cpu
from harness import Results

ROUNDS = e2e_figures.bench_rounds()
pytestmark = pytest.mark.timeout(e2e.comparison_timeout_s(ROUNDS))
STEP = "default"  # torch's default threads, as a user's script has them (torch does not read the quota)


def test_jpeg_training_in_a_one_cpu_container(benchmark: Any, results: Results) -> None:
    pytest.importorskip("PIL")
    pytest.importorskip("torch")
    cases = {
        "plain": {"workload": "jpeg", "system": "plain", "step": STEP},
        # DataLoader's documented default (in the loop), and its best here (1: the CPU the quota allows)
        "DataLoader(num_workers=0) (default)": {"workload": "jpeg", "system": "torch", "step": STEP, "workers": 0},
        "DataLoader(num_workers=1)": {"workload": "jpeg", "system": "torch", "step": STEP, "workers": 1},
        "prefetch": {"workload": "jpeg", "system": "prefetch", "step": STEP, "workers": -1},  # -1: all defaults
    }
    e2e.write_jpegs()
    with one_cpu() as confinement:
        runs = benchmark.pedantic(e2e.compare, args=(cases, ROUNDS, confinement.prefix), rounds=1, iterations=1)
    results.runs["jpeg in a 1-CPU container"] = runs
    started = {run["workers"] for run in runs["prefetch"]}
    for system, system_runs in runs.items():
        rates = [run["images_per_s"] for run in system_runs]
        results.add_table_row(
            "e2e-container",
            {
                "system": system,
                "workers": ", ".join(map(str, sorted(started)))
                if system == "prefetch"
                else cases[system].get("workers", 0),
                "images/s (median)": round(statistics.median(rates), 1),
                "min-max": f"{min(rates):.1f}-{max(rates):.1f}",
                **e2e_figures.comparison_cells(system_runs, {"plain": runs["plain"]}, "images_per_s"),
                "first batch s": round(statistics.median(run["first_batch_s"] for run in system_runs), 3),
                "loop cores": round(statistics.median(run["consumer_cores"] for run in system_runs), 2),
                "worker cores": round(statistics.median(sum(run["other_cores"]) for run in system_runs), 2),
                "rounds": len(system_runs),
                "confined by": confinement.how,
            },
        )
    benchmark.extra_info.update(
        {f"{system}_images_per_s": statistics.median(r["images_per_s"] for r in runs[system]) for system in runs},
        confined_by=confinement.how,
        prefetch_provenance=runs["prefetch"][0]["provenance"],
    )
    assert started == {1}, f"prefetch's default started {started} workers under one CPU: {runs['prefetch'][0]}"
    assert all(len(r) == ROUNDS for r in runs.values())
