"""I/O-bound sources (issue 21.3/21.4): io_threads against the ideal, and batch waits with stragglers.

``io_threads``: a source whose every read waits ``LATENCY_S`` (a sleep: the wait of a disk or network read,
no CPU), 2 workers, ``io_threads`` 1, 8 and 32. The ideal is ``workers * io_threads`` reads in flight all
the time, ``workers * io_threads / LATENCY_S`` samples/s; the report gives the fraction of it reached
(target: >= 80 % at 2 x 32).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from workloads import QUICK

import prefetch

LATENCY_S = 0.002  # one read's wait
WORKERS = 2
IO_BATCH_SIZE = 64  # two rounds of 32 reads per batch at io_threads=32
IO_BATCHES = 6 if QUICK else 120  # timed, after a warm-up of one batch per worker


class LatencySource:
    """``n`` samples of 16 float32; each read sleeps ``latency_s`` first (a read that waits, using no CPU)."""

    def __init__(self, n: int, latency_s: float):
        self.n, self.latency_s = n, latency_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        time.sleep(self.latency_s)
        return np.full(16, i, dtype=np.float32)


@pytest.mark.parametrize("io_threads", [1, 8, 32])
def test_io_threads(results: Any, io_threads: int) -> None:
    """samples/s of a 2 ms-latency source with 2 workers, against ``workers * io_threads / latency``."""
    source = LatencySource(IO_BATCH_SIZE * (IO_BATCHES + WORKERS + 1), LATENCY_S)
    options = {"batch_size": IO_BATCH_SIZE, "shuffle": False, "epochs": 1, "workers": WORKERS}
    with prefetch.Loader(source, io_threads=io_threads, **options) as loader:
        batches = iter(loader)
        for _ in range(WORKERS):
            next(batches)
        start = time.perf_counter()
        for _ in range(IO_BATCHES):
            next(batches)
        seconds = time.perf_counter() - start
    rate = IO_BATCHES * IO_BATCH_SIZE / seconds
    ideal = WORKERS * io_threads / LATENCY_S
    results.add_table_row(
        "io_threads: 2 ms reads, 2 workers",
        {
            "io_threads": io_threads,
            "samples/s": round(rate),
            "ideal samples/s": round(ideal),
            "of ideal": f"{rate / ideal:.0%}",
            "target": ">= 80 %" if io_threads == 32 else "",
        },
    )
