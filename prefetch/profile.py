"""``prefetch.profile``: a short sweep over worker counts on the user's own pipeline.

It answers "would more workers help?" with measurements, not guesses: for each worker
count it builds a loader with the user's factory, pulls batches (optionally running a
stand-in training ``step`` on each), and reports throughput, the data-stall fraction,
memory and CPU, with a one-line recommendation.

One measurement of a few seconds on a shared machine is noise: the same sweep run three
times recommended three different worker counts. So every count is measured ``rounds``
times, interleaved (the counts in order, then in reverse, ...), so that a quiet or a busy
spell of the machine falls on every count alike. Other processes can only slow a round
down, never speed it up, so a count's fastest round is the best estimate of what it can
do (``timeit`` takes the minimum for the same reason); the table also shows the median
and the range. The recommendation is the fewest workers whose best round is within the
noise of the fastest count's (5 %, or how far that count's two best rounds differ, up to
15 %): when two counts cannot be told apart, the one that costs fewer cores and less
memory wins, every time. When the rounds of the fastest count differ widely, the report
says the machine was busy, with its load average.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from ._budget import process_cpus
from ._tuning import contention
from .loader import Loader

# A worker count whose best round is within this share of the fastest count's best round counts as "as fast"...
AS_FAST_SHARE = 0.95
# ... or within the fastest count's own noise (how far its two best rounds differ), up to this much: beyond it
# the measurement is too noisy to excuse a slower choice.
MAX_NOISE_SHARE = 0.15
# When the fastest count's slowest round is more than this share below its best, something else used the
# CPU during the sweep: the report says so.
NOISY_SPREAD = 0.30
# Below this data-stall share, the training step, not the data, bounds the loop.
STEP_BOUND_STALL = 0.10
DEFAULT_ROUNDS = 3

T = TypeVar("T")


@dataclass(frozen=True)
class SweepRow:
    """One worker count's figures: medians over the rounds (``rounds`` holds each round's samples/s)."""

    workers: int
    batches_per_s: float
    samples_per_s: float
    wait_fraction: float  # share of the timed loop spent waiting for data (a stall only with a step)
    worker_busy: float  # mean over workers
    memory_mb: float  # USS summed over consumer, coordinator and workers (RSS where USS is unreadable)
    rounds: tuple[float, ...] = ()  # samples/s of each round, in round order
    consumer_cpu: float = 0.0  # cores the loop's process used (the step included), timed loop only
    workers_cpu: float = 0.0  # cores the workers used together
    cores: int = 0  # cores usable by the process
    consumer_threads: int = 0

    @property
    def samples_per_s_low(self) -> float:
        return min(self.rounds, default=self.samples_per_s)

    @property
    def samples_per_s_high(self) -> float:
        return max(self.rounds, default=self.samples_per_s)

    @property
    def best_round(self) -> float:
        """Samples/s of the fastest round: other processes only ever slow a round down."""
        return self.samples_per_s_high

    @property
    def noise(self) -> float:
        """How far the two fastest rounds differ, relative to the fastest: how reproducible ``best_round`` is."""
        top = sorted(self.rounds, reverse=True)[:2]
        return (top[0] - top[1]) / top[0] if len(top) == 2 and top[0] else 0.0

    @property
    def spread(self) -> float:
        """How far the slowest round fell below the fastest, relative to it (0: all rounds alike)."""
        return 1 - self.samples_per_s_low / self.samples_per_s_high if self.samples_per_s_high else 0.0

    @property
    def contention(self) -> str | None:
        """Whether the step and the workers competed for the cores in this configuration (see ``Stats``)."""
        return contention(self.cores, self.consumer_cpu, self.workers_cpu, self.wait_fraction, self.consumer_threads)


@dataclass(frozen=True)
class ProfileReport:
    rows: list[SweepRow]
    recommendation: str
    stepped: bool = False  # whether a training step ran in the loop (else: the loader alone)
    notes: tuple[str, ...] = ()  # printed between the table and the recommendation

    def to_dict(self) -> dict[str, Any]:
        rows = [{**asdict(row), "rounds": list(row.rounds)} for row in self.rows]
        return {"rows": rows, "recommendation": self.recommendation, "stepped": self.stepped, "notes": list(self.notes)}

    def __str__(self) -> str:
        base = self.rows[0].samples_per_s or 1.0
        waiting = "stall" if self.stepped else "waiting"
        lines = [
            f"{'workers':>7}  {'batches/s':>10}  {'samples/s':>10}  {'range':>13}  {'vs first':>8}  {waiting:>7}  "
            f"{'busy':>5}  {'cores l+w':>9}  {'memory':>9}"
        ]
        for row in self.rows:
            spread = f"{row.samples_per_s_low:.0f}-{row.samples_per_s_high:.0f}"
            cpu = f"{row.consumer_cpu:.1f}+{row.workers_cpu:.1f}"
            lines.append(
                f"{row.workers:>7}  {row.batches_per_s:>10.1f}  {row.samples_per_s:>10.0f}  {spread:>13}  "
                f"{row.samples_per_s / base:>7.2f}x  {row.wait_fraction:>7.1%}  {row.worker_busy:>5.0%}  "
                f"{cpu:>9}  {row.memory_mb:>6.0f} MiB"
            )
        return "\n".join([*lines, *self.notes, self.recommendation])


def _progress(items: Sequence[T], enabled: bool) -> Iterable[T]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm  # optional: pip install prefetch[profile]

        return tqdm(items, desc="prefetch.profile", unit="run")
    except ImportError:
        return items


@dataclass(frozen=True)
class _Round:
    """One timed run of one worker count."""

    batches_per_s: float
    samples_per_s: float
    wait_fraction: float
    worker_busy: float
    memory_mb: float
    consumer_cpu: float
    workers_cpu: float
    cores: int
    consumer_threads: int


def _measure(loader: Loader, batches: int, warmup: int, step: Callable[[Any], None] | None) -> _Round:
    with loader:
        iterator = loader.stream()  # warmup + batches may be more than an epoch
        for _ in range(warmup):
            next(iterator)
        before = loader.stats()  # the timed window's CPU figures are the difference of two snapshots
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
            del batch  # its slot goes back before the next one is asked for
        elapsed = time.perf_counter() - started
        window = loader.stats().since(before)
        iterator.close()
    busy = list(window.worker_busy.values())
    memory = window.memory.get("uss_total") or sum(size for role, size in window.memory.items() if role != "uss_total")
    return _Round(
        batches_per_s=batches / elapsed,
        samples_per_s=samples / elapsed,
        wait_fraction=waited / elapsed,
        worker_busy=sum(busy) / len(busy) if busy else 0.0,
        memory_mb=memory / 2**20,
        consumer_cpu=window.consumer_cpu,
        workers_cpu=window.workers_cpu,
        cores=window.cores,
        consumer_threads=window.consumer_threads,
    )


def _row(workers: int, runs: list[_Round]) -> SweepRow:
    def median(name: str) -> float:
        import statistics  # lazily: `import prefetch` stays fast (statistics pulls in decimal, fractions)

        return float(statistics.median(getattr(run, name) for run in runs))

    return SweepRow(
        workers=workers,
        batches_per_s=median("batches_per_s"),
        samples_per_s=median("samples_per_s"),
        wait_fraction=median("wait_fraction"),
        worker_busy=median("worker_busy"),
        memory_mb=median("memory_mb"),
        rounds=tuple(run.samples_per_s for run in runs),
        consumer_cpu=median("consumer_cpu"),
        workers_cpu=median("workers_cpu"),
        cores=runs[0].cores,
        consumer_threads=round(median("consumer_threads")),
    )


def _batch_len(batch: Any) -> int:
    first = batch[0] if isinstance(batch, tuple) else batch
    if isinstance(first, dict):
        first = next(iter(first.values()))
    try:
        return len(first)
    except TypeError:
        return 1


def shortfall(row: SweepRow, best: SweepRow) -> float:
    """How much slower ``row`` is than ``best``, by their fastest rounds (``1 - row / best``)."""
    return 1 - row.best_round / best.best_round if best.best_round else 0.0


def _workers(n: int) -> str:
    return f"{n} worker{'' if n == 1 else 's'}"


def _rate(row: SweepRow, unit: str = " samples/s") -> str:
    """``830 samples/s (best of 3, range 790-830)``: the fastest round, and the range when measured more than once."""
    if len(row.rounds) > 1:
        low, high = row.samples_per_s_low, row.samples_per_s_high
        return f"{row.best_round:.0f}{unit} (best of {len(row.rounds)}, range {low:.0f}-{high:.0f})"
    return f"{row.best_round:.0f}{unit}"


def _fastest(rows: list[SweepRow]) -> SweepRow:
    return max(rows, key=lambda row: row.best_round)


def _tolerance(best: SweepRow) -> float:
    return max(1 - AS_FAST_SHARE, min(MAX_NOISE_SHARE, best.noise))


def choose(rows: list[SweepRow]) -> SweepRow:
    """The fewest workers whose fastest round is within the tolerance of the fastest count's: 5 %, or
    that count's own noise when larger (at most 15 %). When the sweep was too noisy to choose by (see
    ``noisy``), the count nearest the default instead (one worker per usable core, or fewer): a busy
    machine must not talk the user out of the default by chance."""
    if noisy(rows) is not None:
        return _nearest_default(rows)
    best = _fastest(rows)
    tolerance = _tolerance(best)
    return min((row for row in rows if shortfall(row, best) <= tolerance), key=lambda row: row.workers)


def _nearest_default(rows: list[SweepRow]) -> SweepRow:
    cores = process_cpus()
    at_most = [row for row in rows if row.workers <= cores]
    if at_most:
        return max(at_most, key=lambda row: row.workers)
    return min(rows, key=lambda row: row.workers)


def noisy(rows: list[SweepRow]) -> str | None:
    """Why the sweep cannot choose by measurement, or None: when some count's slowest round fell more than
    30 % below its fastest, other processes took the CPU for much of the sweep, and differences between
    the counts are as likely to be theirs as the pipeline's."""
    worst = max(rows, key=lambda row: row.spread)
    if worst.spread <= NOISY_SPREAD:
        return None
    try:
        load = f"load average {os.getloadavg()[0]:.1f} on {process_cpus()} cores"
    except OSError:  # pragma: no cover - not available
        load = f"{process_cpus()} cores"
    return (
        f"the rounds of {_workers(worst.workers)} ranged {worst.samples_per_s_low:.0f}-"
        f"{worst.samples_per_s_high:.0f} samples/s ({load}): other processes used the CPU"
    )


def recommend(rows: list[SweepRow], stepped: bool) -> str:
    """One line: which worker count to use (``choose``), by what margin, and what bounds the loop."""
    choice = choose(rows)
    why_not = noisy(rows)
    if why_not is not None:
        fastest = ", ".join(f"{_workers(row.workers)} {row.best_round:.0f}" for row in rows)
        cores = process_cpus()
        default = "the default" if choice.workers == cores else f"nearest the default of {cores}"
        return (
            f"{_workers(choice.workers)}, {default} (one per usable core): too noisy to choose by measurement -- "
            f"{why_not}; fastest rounds, samples/s: {fastest}. Run it again on a quiet machine"
        )
    best = _fastest(rows)
    tolerance = _tolerance(best)
    words = [f"{_workers(choice.workers)}: {_rate(choice)}"]
    if choice is not best:
        words[0] += (
            f", within {max(0.0, shortfall(choice, best)):.0%} of {_workers(best.workers)}' "
            f"{best.best_round:.0f}, inside the noise of {tolerance:.0%}: more workers gain nothing measurable"
        )
    elif choice.workers < max(row.workers for row in rows):
        words.append("more workers do not help")
    fewer = [row for row in rows if row.workers < choice.workers]
    if fewer:
        below = max(fewer, key=lambda row: row.workers)
        words.append(f"{_workers(below.workers)}: {shortfall(below, best):.0%} behind the fastest")
    if stepped and choice.wait_fraction < STEP_BOUND_STALL:
        words.append("the training step is the bottleneck, data keeps up")
    elif choice.worker_busy > 0.9 and choice.workers >= process_cpus():
        words.append(f"the workers are saturated on {process_cpus()} cores: make the transform cheaper")
    elif choice.worker_busy < 0.5 and choice.workers > 0:
        words.append("the workers idle: the consumer is the bottleneck")
    return "; ".join(words)


def notes(choice: SweepRow, stepped: bool) -> tuple[str, ...]:
    """What the table does not say by itself: without a step the waiting is no stall; with one, whether
    the step and the workers competed for the cores at the recommended count."""
    if not stepped:
        return (
            "no step: the sweep measures the loader alone, so the loop waits for every batch by design "
            "('waiting' is the loader's full speed, not a stall); pass step= (a stand-in for your training step) "
            "to see the stall and the CPU sharing your training would see",
        )
    note = choice.contention
    return () if note is None else (f"at {_workers(choice.workers)}, {note}",)


def profile(
    loader_factory: Callable[..., Loader],
    workers: Sequence[int] = (0, 1, 2, 4),
    batches: int = 50,
    warmup: int = 5,
    step: Callable[[Any], None] | None = None,
    progress: bool = True,
    rounds: int = DEFAULT_ROUNDS,
) -> ProfileReport:
    """Measure ``loader_factory(workers=w)`` for each ``w``, ``rounds`` times, and recommend a worker count.

    ``step(batch)``, if given, stands in for the training step, so the stall fraction and the CPU
    sharing are the ones your loop would see; without it the sweep measures the loader alone.
    Each count is timed ``rounds`` times, interleaved, and reported as a median with its range.
    Example::

        report = prefetch.profile(lambda workers: prefetch.Loader(x, y, batch_size=64,
                                  transform=augment, workers=workers), workers=[1, 2, 4])
        print(report)
    """
    counts = list(dict.fromkeys(workers))
    if not counts:
        raise ValueError("profile needs at least one worker count")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    # Round r measures the counts forwards when r is even, backwards when odd: a machine whose load
    # drifts during the sweep favours no count.
    schedule = [(r, w) for r in range(rounds) for w in (counts if r % 2 == 0 else counts[::-1])]
    runs: dict[int, list[_Round]] = {w: [] for w in counts}
    for _, w in _progress(schedule, progress):
        runs[w].append(_measure(loader_factory(workers=w), batches, warmup, step))
    rows = [_row(w, runs[w]) for w in counts]
    stepped = step is not None
    return ProfileReport(rows, recommend(rows, stepped), stepped=stepped, notes=notes(choose(rows), stepped))


def load_factory(spec: str) -> Callable[..., Loader]:
    """``"package.module:function"`` -> the function (for ``python -m prefetch profile``)."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"expected module:factory, e.g. mypipeline:make_loader; got {spec!r}")
    factory: Callable[..., Loader] = getattr(importlib.import_module(module_name), name)
    return factory
