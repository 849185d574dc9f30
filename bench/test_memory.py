"""Memory over a run of large batches: bounded by the prefetch depth, flat over time, no copy of the data."""

from __future__ import annotations

import statistics
from itertools import islice
from typing import Any

import psutil
import pytest
from harness import SYSTEM_LABELS, Results, children, own_segments
from workloads import QUICK, WORKLOADS, open_stream

WORKERS = 2
BATCHES = 30 if QUICK else 120
SAMPLE_EVERY = 5 if QUICK else 10
MIB = 2**20


def _sample() -> dict[str, Any]:
    """USS and PSS of the consumer and each of its child processes, and this process's shm segments."""
    consumer = psutil.Process()
    uss: dict[int, int] = {}
    pss: dict[int, int] = {}
    rss: dict[int, int] = {}
    for process in [consumer, *children()]:
        try:
            info = process.memory_full_info()
        except psutil.Error:
            continue
        uss[process.pid] = info.uss
        rss[process.pid] = info.rss
        pss[process.pid] = getattr(info, "pss", 0)
    segments = own_segments()
    others = [size for pid, size in uss.items() if pid != consumer.pid]
    return {
        "uss_sum": sum(uss.values()),
        "pss_sum": sum(pss.values()),
        "rss_sum": sum(rss.values()),
        "consumer_uss": uss.get(consumer.pid, 0),
        "largest_child_uss": max(others, default=0),
        "shm_bytes": sum(segments.values()),
        "shm_segments": len(segments),
    }


@pytest.mark.parametrize(
    ("system", "loop"),
    [("prefetch", "for loop"), ("prefetch", "drops each batch"), ("torch", "for loop")],
)
def test_memory(results: Results, system: str, loop: str) -> None:
    """Peak and steady memory of the consumer and its workers over ~100 batches of 9.6 MB (2 workers),
    sampled every 10 batches while the consumer holds the current batch; growth from the first to the last
    third of the run; shared-memory bytes against ``prefetch`` x batch bytes.

    Why: the contract says memory is bounded by the prefetch depth, does not grow over long runs, and
    workers do not copy the data set (38 MB here: a worker's USS well under it means it shares the parent's
    pages). torch DataLoader (numpy collate) is measured the same way for comparison. ``for loop`` is a
    plain loop, which still binds the previous batch while the next one is fetched (one slot more);
    ``drops each batch`` lets go of it first, as a consumer that keeps nothing does.
    """
    if system == "torch":
        pytest.importorskip("torch")
    workload = WORKLOADS["bigarray"]
    data_x, _ = workload.data()
    samples = []
    with open_stream(system, workload, WORKERS) as stream:
        batches = islice(stream.batches, BATCHES)
        for number in range(BATCHES):
            batch = next(batches)
            workload.check(batch)
            if number % SAMPLE_EVERY == 0 or number == BATCHES - 1:
                samples.append(_sample())
            if loop == "drops each batch":
                del batch
        depth = stream.loader.prefetch if stream.loader is not None else None
    assert len(samples) >= 3

    third = max(1, len(samples) // 3)
    uss = [s["uss_sum"] for s in samples]
    bound = depth * workload.batch_bytes if depth else None
    shm_peak = max(s["shm_bytes"] for s in samples)
    results.add_table_row(
        "memory",
        {
            "system": SYSTEM_LABELS[system],
            "consumer": loop,
            "workers": WORKERS,
            "batches": BATCHES,
            "samples": len(samples),
            "USS sum peak MiB": max(uss) / MIB,
            "USS sum median MiB": statistics.median(uss) / MIB,
            "growth first->last third MiB": (statistics.mean(uss[-third:]) - statistics.mean(uss[:third])) / MIB,
            "PSS sum peak MiB": max(s["pss_sum"] for s in samples) / MIB,
            "RSS sum peak MiB": max(s["rss_sum"] for s in samples) / MIB,
            "consumer USS peak MiB": max(s["consumer_uss"] for s in samples) / MIB,
            "largest child USS peak MiB": max(s["largest_child_uss"] for s in samples) / MIB,
            "data set MiB": data_x.nbytes / MIB,
            "prefetch depth": depth,
            "shm peak MiB": shm_peak / MIB if depth else None,
            "shm peak / (depth x batch)": shm_peak / bound if bound else None,
            "shm segments peak": max(s["shm_segments"] for s in samples) if depth else None,
        },
    )


COPY_ON_READ_ITEMS = 50_000 if QUICK else 1_000_000


class _ListDataset:
    """A map-style dataset over a Python list (a torch ``Dataset`` by duck typing)."""

    def __init__(self, items: list[float]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> float:
        return self.items[i]


def _children_uss() -> int:
    total = 0
    for process in children():
        try:
            total += process.memory_full_info().uss
        except psutil.Error:
            continue
    return total


@pytest.mark.parametrize("system", ["prefetch", "torch"])
def test_copy_on_read(results: Results, system: str) -> None:
    """Worker memory growth over one epoch of a source that is a large Python list (1M floats, ~32 MB of
    objects): reading an object in a forked worker writes its reference count, which copies the page.

    Why: the classic 'memory leak' of forked data loaders. It is not prefetch's to remove (the doctor warns
    about it and suggests a numpy array), but the figure tells users what it costs, next to torch's.
    """
    items = [float(i) for i in range(COPY_ON_READ_ITEMS)]
    batch_size = 1024
    if system == "torch":
        torch = pytest.importorskip("torch")
        loader: Any = torch.utils.data.DataLoader(
            _ListDataset(items), batch_size=batch_size, shuffle=True, num_workers=WORKERS, persistent_workers=True
        )
        batches = iter(loader)
        next(batches)
        start = _children_uss()
        for _ in batches:
            pass
        end = _children_uss()
        del batches, loader
    else:
        import prefetch

        with prefetch.Loader(items, batch_size=batch_size, workers=WORKERS, seed=0) as ploader:
            batches = ploader.stream()  # endless: the workers are still there to be measured after the epoch
            next(batches)
            start = _children_uss()
            for _ in range(ploader.steps_per_epoch):
                next(batches)
            end = _children_uss()
            batches.close()
    results.add_table_row(
        "copy-on-read",
        {
            "system": SYSTEM_LABELS[system],
            "workers": WORKERS,
            "list items": COPY_ON_READ_ITEMS,
            "workers' USS at first batch MiB": start / MIB,
            "workers' USS after one epoch MiB": end / MIB,
            "growth MiB": (end - start) / MIB,
        },
    )
