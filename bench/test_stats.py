"""What ``loader.stats()`` costs: the per-batch bookkeeping against the per-batch time of the overhead workload."""

from __future__ import annotations

import time
import timeit
from itertools import islice

from harness import Results
from workloads import QUICK, WORKLOADS, open_stream

from prefetch.core.pipeline import Timings
from prefetch.stats import StatsRecorder

BATCHES = 500 if QUICK else 5000


def test_stats_overhead(results: Results) -> None:
    """The consumer records every batch (counts, wait, stage timings); workers time their stages with a few
    ``perf_counter`` calls. Why: the issue wants it under 2 % of the overhead workload's per-batch time."""
    recorder = StatsRecorder()
    timings = Timings(1e-5, 1e-5, 1e-5, 1e-5)
    calls = 100_000
    record_s = timeit.timeit(lambda: recorder.delivered(32, 1e-5, 1, timings, 1), number=calls) / calls
    clock_s = timeit.timeit(time.perf_counter, number=calls) / calls * 6  # the worker's timestamps per batch
    workload = WORKLOADS["overhead"]
    with open_stream("prefetch", workload, 2) as stream:
        batches = stream.batches
        next(batches)
        started = time.perf_counter()
        for _ in islice(batches, BATCHES):
            pass
        per_batch_s = (time.perf_counter() - started) / BATCHES
    results.add_table_row(
        "stats",
        {
            "consumer bookkeeping per batch us": record_s * 1e6,
            "worker timestamps per batch us": clock_s * 1e6,
            "overhead workload per batch us (2 workers)": per_batch_s * 1e6,
            "share": f"{(record_s + clock_s) / per_batch_s:.2%}",
        },
    )
