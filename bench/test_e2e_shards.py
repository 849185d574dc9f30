"""End to end from WebDataset tar shards: ``prefetch.TarShards`` against the ``webdataset`` package.

The JPEG training run of ``test_e2e.py`` with its images packed into tar shards of 128 samples
(``e2e_shards.py``): prefetch's ``TarShards`` with a global shuffle (and a block
shuffle: one line below) against ``wds.WebDataset(...).shuffle(...).decode(...)`` batched by
``DataLoader(num_workers=2)``, at the same 2 workers, interleaved in fresh processes like every e2e case.
What prefetch adds that webdataset lacks -- an exact resume at any batch, whatever the workers -- is a test
(tests/readers/test_tar.py::test_resume_mid_epoch_gives_the_rest_of_the_stream), not a figure.
"""

from __future__ import annotations

import statistics
from typing import Any

import e2e
import e2e_shards
import pytest
from harness import Results

ROUNDS = e2e.bench_rounds()
STEP_LABELS = {"none": "none (loader alone)", "default": "torch default threads", "1": "1 thread"}


@pytest.mark.parametrize("step", ["none", "default"])
def test_jpeg_training_from_tar_shards(benchmark: Any, results: Results, step: str) -> None:
    """JPEG tar shards -> decode, RandomResizedCrop(224), flip -> batches of 64, into the torch step (or none).

    Why: data larger than memory comes as shards; prefetch reads them by index (global shuffle, exact resume)
    and must be at least webdataset + DataLoader's speed at the same workers.
    """
    for module in ("PIL", "torch", "webdataset"):
        pytest.importorskip(module)
    base = {"workload": "jpeg", "step": step, "workers": 2}
    cases = {
        "webdataset": {**base, "system": "webdataset"},
        "prefetch-tar (global shuffle)": {**base, "system": "prefetch-tar"},
        "prefetch-tar (block shuffle)": {**base, "system": "prefetch-tar", "shuffle": "block", "block_size": 128},
    }
    e2e_shards.write_shards()
    runs = benchmark.pedantic(e2e.compare, args=(cases, ROUNDS), rounds=1, iterations=1)
    webdataset = statistics.median(run["images_per_s"] for run in runs["webdataset"])
    for system, system_runs in runs.items():
        rates = [run["images_per_s"] for run in system_runs]
        results.add_table_row(
            "e2e-jpeg-shards",
            {
                "system": system,
                "training step": STEP_LABELS[step],
                "images/s (median)": round(statistics.median(rates), 1),
                "min-max": f"{min(rates):.1f}-{max(rates):.1f}",
                "vs webdataset": f"{statistics.median(rates) / webdataset:.2f}x",
                "paired vs webdataset": f"{e2e.paired_ratio(system_runs, runs['webdataset'], 'images_per_s'):.2f}x",
                "first batch s": round(statistics.median(run["first_batch_s"] for run in system_runs), 3),
                "rounds": len(system_runs),
            },
        )
    benchmark.extra_info.update(
        {f"{system}_images_per_s": statistics.median(r["images_per_s"] for r in rs) for system, rs in runs.items()}
    )
    assert all(len(r) == ROUNDS for r in runs.values())
