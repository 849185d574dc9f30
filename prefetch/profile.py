"""``prefetch.profile``: a short sweep over worker counts on the user's own pipeline.

It answers "would more workers help?" with measurements, not guesses: for each worker
count it builds a loader with the user's factory, pulls batches (optionally running a
stand-in training ``step`` on each), and reports throughput, the data-stall fraction
and memory, with a one-line recommendation.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .config import usable_cores
from .loader import Loader

# A worker count within this share of the best throughput counts as "as fast".
AS_FAST_SHARE = 0.95
# Below this data-stall share, the training step, not the data, bounds the loop.
STEP_BOUND_STALL = 0.10


@dataclass(frozen=True)
class SweepRow:
    workers: int
    batches_per_s: float
    samples_per_s: float
    wait_fraction: float
    worker_busy: float  # mean over workers
    memory_mb: float  # USS summed over consumer, coordinator and workers (RSS where USS is unreadable)


@dataclass(frozen=True)
class ProfileReport:
    rows: list[SweepRow]
    recommendation: str

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(row) for row in self.rows], "recommendation": self.recommendation}

    def __str__(self) -> str:
        base = self.rows[0].samples_per_s or 1.0
        lines = [
            f"{'workers':>7}  {'batches/s':>10}  {'samples/s':>10}  {'vs first':>8}  {'stall':>6}  "
            f"{'busy':>5}  {'memory':>9}"
        ]
        for row in self.rows:
            lines.append(
                f"{row.workers:>7}  {row.batches_per_s:>10.1f}  {row.samples_per_s:>10.0f}  "
                f"{row.samples_per_s / base:>7.2f}x  {row.wait_fraction:>6.1%}  {row.worker_busy:>5.0%}  "
                f"{row.memory_mb:>6.0f} MiB"
            )
        return "\n".join(lines) + "\n" + self.recommendation


def _progress(items: Sequence[int], enabled: bool) -> Iterable[int]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm  # optional: pip install prefetch[profile]

        return tqdm(items, desc="prefetch.profile", unit="config")
    except ImportError:
        return items


def _measure(loader: Loader, workers: int, batches: int, warmup: int, step: Callable[[Any], None] | None) -> SweepRow:
    with loader:
        iterator = iter(loader)
        for _ in range(warmup):
            next(iterator)
        started = time.perf_counter()
        waited = 0.0
        samples = 0
        for _ in range(batches):
            asked = time.perf_counter()
            batch = next(iterator)
            waited += time.perf_counter() - asked
            samples += _batch_len(batch)
            if step is not None:
                step(batch)
        elapsed = time.perf_counter() - started
        stats = loader.stats()
        iterator.close()
    busy = list(stats.worker_busy.values())
    return SweepRow(
        workers=workers,
        batches_per_s=batches / elapsed,
        samples_per_s=samples / elapsed,
        wait_fraction=waited / elapsed,
        worker_busy=sum(busy) / len(busy) if busy else 0.0,
        memory_mb=(
            stats.memory.get("uss_total") or sum(size for role, size in stats.memory.items() if role != "uss_total")
        )
        / 2**20,
    )


def _batch_len(batch: Any) -> int:
    first = batch[0] if isinstance(batch, tuple) else batch
    if isinstance(first, dict):
        first = next(iter(first.values()))
    try:
        return len(first)
    except TypeError:
        return 1


def recommend(rows: list[SweepRow], stepped: bool) -> str:
    """One line: which worker count to use, and what bounds the loop."""
    best = max(rows, key=lambda row: row.samples_per_s)
    enough = min(
        (row for row in rows if row.samples_per_s >= AS_FAST_SHARE * best.samples_per_s), key=lambda r: r.workers
    )
    one = next((row for row in rows if row.workers == 1), rows[0])
    speedup = enough.samples_per_s / one.samples_per_s if one.samples_per_s else float("nan")
    words = [f"{enough.workers} workers: {speedup:.1f}x over {one.workers}"]
    if enough.workers < max(row.workers for row in rows):
        words.append("more workers do not help")
    if stepped and enough.wait_fraction < STEP_BOUND_STALL:
        words.append("the training step is the bottleneck, data keeps up")
    elif enough.worker_busy > 0.9 and enough.workers >= usable_cores():
        words.append(f"the workers are saturated on {usable_cores()} cores: make the transform cheaper")
    elif enough.worker_busy < 0.5 and enough.workers > 0:
        words.append("the workers idle: the consumer is the bottleneck")
    return "; ".join(words)


def profile(
    loader_factory: Callable[..., Loader],
    workers: Sequence[int] = (0, 1, 2, 4),
    batches: int = 50,
    warmup: int = 5,
    step: Callable[[Any], None] | None = None,
    progress: bool = True,
) -> ProfileReport:
    """Measure ``loader_factory(workers=w)`` for each ``w`` and recommend a worker count.

    ``step(batch)``, if given, stands in for the training step, so the stall fraction is
    the one your loop would see. Example::

        report = prefetch.profile(lambda workers: prefetch.Loader(x, y, batch_size=64,
                                  transform=augment, workers=workers), workers=[1, 2, 4])
        print(report)
    """
    rows = [_measure(loader_factory(workers=w), w, batches, warmup, step) for w in _progress(list(workers), progress)]
    return ProfileReport(rows, recommend(rows, step is not None))


def load_factory(spec: str) -> Callable[..., Loader]:
    """``"package.module:function"`` -> the function (for ``python -m prefetch profile``)."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"expected module:factory, e.g. mypipeline:make_loader; got {spec!r}")
    factory: Callable[..., Loader] = getattr(importlib.import_module(module_name), name)
    return factory
