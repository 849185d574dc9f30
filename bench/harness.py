"""The measuring harness, the results collector and the report, shared by the benchmark files.

``measure`` times one system's stream; ``RESULTS`` collects every measurement of the session; ``render_markdown``
and ``render_json`` turn them into ``bench/results/latest.md`` and ``latest.json`` (``conftest`` writes them at
the end of the session and prints the tables).
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from itertools import islice
from pathlib import Path
from typing import Any

import e2e
import psutil
import workloads
from workloads import Stream, Workload

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
SHM_DIR = "/dev/shm"
# multiprocess's helper processes live as long as the session by design; they are not a loader's.
SESSION_HELPERS = ("resource_tracker", "forkserver")

SYSTEM_LABELS = {
    "plain": "plain generator",
    "memcpy": "memcpy (np.copyto, 1 thread)",
    "pool": "multiprocess.Pool.imap",
    "torch": "torch DataLoader",
    "torch-tensor": "torch DataLoader, tensor collate",
    "prefetch": "prefetch",
    "ray": "prefetch, executor=ray",
    "ray-view": "prefetch, executor=ray, copy=False (read-only views)",
}
SECTION_ORDER = (
    "e2e-jpeg",
    "e2e-data-bound",
    "e2e-keras",
    "e2e-container",
    "cpu",
    "latency",
    "bigarray",
    "overhead",
    "epochs",
    "startup",
    "memory",
    "copy-on-read",
    "stats",
    "order",
)
# What the end-to-end tables' columns mean (e2e.py, e2e_figures.py).
E2E_FIGURES = (
    f"Images/s over {e2e.JPEG_TIMED_BATCHES} timed batches after {e2e.JPEG_WARMUP_BATCHES} warm-up batches (which "
    "cover prefetch's measurement of the training threads). Paired vs X: the median over rounds of (this system "
    "/ X) within each round; per round vs X: every round's ratio, in round order. Batches to steady: how many "
    "batches the run took before its per-batch time settled -- the first batch from which the rolling median of "
    "10 batches stays within 10 % of the timed batches' median (median over rounds, range in brackets; >N: never "
    "within the run). Decided after batch: when prefetch's decisions (worker priority, the training threads its "
    "tuner chose) last changed, per round. First batch = from constructing the loader to holding batch 0; loop / "
    "worker cores = CPU seconds per wall second of the training process and of its children."
)
SECTION_TEXT = {
    "e2e-jpeg": (
        "End to end: JPEG files into a torch training step, the compute-bound loop (`e2e`)",
        "What a user gets. JPEG files (500x400, q90) -> Pillow decode -> RandomResizedCrop(224) -> flip -> uint8 "
        "batches of 64, consumed by a small torch CNN's SGD step at torch's default threads, at 1 thread, or by "
        "nothing (the loader alone). Each system's run is a fresh process; systems interleaved round after round. "
        "DataLoader: persistent workers, at num_workers=2 (the target's reference), and at torch's default threads "
        "also at its documented default (0) and at 1 to the cores + 1 (the best by median marked); prefetch: all "
        "defaults. " + E2E_FIGURES + " Target at torch's default threads: prefetch >= 1.3x plain and >= 1.05x "
        "DataLoader(2).",
    ),
    "e2e-data-bound": (
        "End to end: the data-bound loop, JPEG files into one linear layer (`e2e`)",
        "The same JPEG pipeline into a step of a few ms (SGD on one linear layer over 8x8-pooled images, torch's "
        "default threads): preprocessing is the whole cost. Plain generator; DataLoader at its documented default "
        "(num_workers=0) and at 1 to the cores + 1 (the best by median marked); prefetch at all its defaults. "
        + E2E_FIGURES,
    ),
    "e2e-keras": (
        "End to end: Keras fit, the seed's use case (`e2e`)",
        f"Keras fit (torch backend, all defaults) for {e2e.KERAS_EPOCHS} epochs of "
        f"{e2e.KERAS_SAMPLES // e2e.KERAS_BATCH} steps: 8x8 digits upsampled to 32x32, a ~1 ms/"
        "sample numpy augmentation (pad/crop, flip, noise, blur), a small CNN, batch 32; the seed's plain generator "
        "against prefetch.data_generator with all defaults. Wall time per epoch, first epoch (start-up) included; "
        "ratios are epochs per second (> 1: faster). Batches to steady: as in the JPEG tables, over every batch of "
        "the run, against the last epoch's median. Target: prefetch >= 1.3x plain.",
    ),
    "e2e-container": (
        "End to end in a 1-CPU container (`e2e`, issue 20)",
        "The JPEG pipeline into the torch step (default threads) with every run confined to one CPU: a cgroup "
        "with a CPU quota of 1 CPU that the bench makes and removes (or `taskset -c` to one core when cgroups are "
        "not writable; the table says which). Plain generator, DataLoader at its default (num_workers=0) and at "
        "num_workers=1, prefetch at all its defaults. " + E2E_FIGURES + " Target: prefetch's default starts 1 "
        "worker (the quota, not the host's cores) and is never slower than the plain generator (every round's "
        "ratio >= 1).",
    ),
    "startup": (
        "Start-up",
        "Fresh subprocess per round. `import` = time of the import statement alone. First batch = from "
        "constructing the loader to holding its first batch (overhead workload; the loader's own lazy imports "
        "included, torch's `import torch` not); close = from there to all workers gone.",
    ),
    "memory": (
        "Memory",
        "Large-array workload, 2 workers. USS (memory unique to a process), PSS and RSS summed over the "
        "consumer and all its child processes, sampled along the run (RSS counts shared pages once per process "
        "that maps them, so its sum overstates); growth = mean of the last third of USS samples minus the first "
        "third; shm = bytes of this run's /dev/shm segments, against prefetch depth x batch bytes. A `for loop` "
        "consumer still binds the previous batch while the next is fetched; one that `drops each batch` does not.",
    ),
    "copy-on-read": (
        "Copy-on-read",
        "A source that is a Python list of 1M floats, 2 forked workers: their USS at the first batch and after "
        "one epoch. Reading an object writes its reference count, which copies its page into the worker; a "
        "numpy array source has no such growth (prefetch.doctor() warns about large list sources).",
    ),
    "order": (
        "The order at any size (`test_order`)",
        "A source that reports a huge len and holds no data (sample i: four int64s made on demand), batch 32, "
        "shuffled. Each case a fresh interpreter under an address-space limit (RLIMIT_AS) and a timeout; first "
        "batch = from constructing the loader to holding batch 0, after a loader of 10 samples has paid the "
        "imports; peak RSS added = the process's peak RSS (VmHWM, reset just before) less its RSS then; children = "
        "the coordinator or workers. A case that fails under the limit says how.",
    ),
    "stats": (
        "Cost of loader.stats()",
        "The consumer's bookkeeping per batch and the worker's stage timestamps, against the per-batch time "
        "of the overhead workload with 2 workers.",
    ),
}


# --- the collector ----------------------------------------------------------------------------------------


@dataclass
class Row:
    """One measurement: a system on a workload at a worker count, over several rounds."""

    workload: str
    system: str
    workers: int | None
    unit: str  # samples/s, GB/s, batches/s (higher is better) or s (lower is better)
    values: list[float]  # one per round
    consumer_cores: list[float] = field(default_factory=list)  # consumer CPU seconds / wall seconds
    total_cores: list[float] = field(default_factory=list)  # the same, consumer and all its children
    batches_per_round: int | None = None
    variant: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        """The median over rounds: the figure the report shows."""
        return statistics.median(self.values)

    def to_dict(self) -> dict[str, Any]:
        """The row with its summary figures, for ``latest.json``."""
        return {
            **asdict(self),
            "median": self.median,
            "min": min(self.values),
            "max": max(self.values),
            "consumer_cores_median": _median_or_none(self.consumer_cores),
            "total_cores_median": _median_or_none(self.total_cores),
        }


def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class Results:
    """Everything measured in this session, for the report."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.tables: dict[str, list[dict[str, Any]]] = {}  # free-form sections (memory)
        self.runs: dict[str, Any] = {}  # end-to-end comparisons: every round's result, by case (JSON only)
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.load_at_start = os.getloadavg()
        self.numpy_imported_early = False  # set by conftest: then BLAS may have missed the 1-thread setting

    def add(self, row: Row) -> Row:
        """Record a measurement; return it."""
        self.rows.append(row)
        return row

    def add_table_row(self, section: str, row: dict[str, Any]) -> None:
        """Record one row of a free-form section (its keys are the column names)."""
        self.tables.setdefault(section, []).append(row)

    def empty(self) -> bool:
        """Whether nothing was measured (then no report is written)."""
        return not self.rows and not self.tables


RESULTS = Results()


# --- processes and CPU time -------------------------------------------------------------------------------


def children() -> list[psutil.Process]:
    """This process's descendants, less multiprocess's session helpers."""
    kids = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if not any(helper in cmdline for helper in SESSION_HELPERS):
            kids.append(child)
    return kids


def _cpu_s(process: psutil.Process) -> float | None:
    try:
        times = process.cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def _cpu_by_pid(processes: list[psutil.Process]) -> dict[int, float]:
    found = {}
    for process in processes:
        seconds = _cpu_s(process)
        if seconds is not None:
            found[process.pid] = seconds
    return found


def own_segments() -> dict[str, int]:
    """This process's loaders' shared-memory segments: name -> bytes."""
    prefix = f"prefetch-{os.getpid()}-"
    found = {}
    for name in os.listdir(SHM_DIR):
        if name.startswith(prefix):
            try:
                found[name] = os.stat(os.path.join(SHM_DIR, name)).st_size
            except FileNotFoundError:
                continue
    return found


# --- the harness ------------------------------------------------------------------------------------------


def warm_up(batches: Iterator[Any], workload: Workload, workers: int | None) -> int:
    """Take the first batches (start-up, pipeline fill), check the first one's shape, then estimate the
    steady rate; return the number of batches a timed round takes to last about ``ROUND_S``."""
    workload.check(next(batches))
    for _ in range(2 * max(workers or 0, 1) + 1):
        next(batches)
    taken = 0
    started = time.perf_counter()
    while taken < 2 or time.perf_counter() - started < workloads.WARMUP_S:
        next(batches)
        taken += 1
    rate = taken / (time.perf_counter() - started)
    wanted = max(
        workloads.MIN_BATCHES_PER_ROUND, min(workloads.MAX_BATCHES_PER_ROUND, math.ceil(rate * workloads.ROUND_S))
    )
    # A whole number of batches per worker: workers that finish together (latency) deliver in bursts of
    # ``workers`` batches, and a round that ends mid-burst would be off by part of a burst.
    step = max(workers or 0, 1)
    return math.ceil(wanted / step) * step


def measure(
    benchmark: Any,
    results: Results,
    stream: Stream,
    workload: Workload,
    system: str,
    workers: int | None,
    *,
    variant: str = "",
    extra: dict[str, Any] | None = None,
) -> Row:
    """Warm ``stream`` up, then time ``ROUNDS`` rounds of a fixed number of batches with
    ``benchmark.pedantic``; record the throughput and the CPU used in ``results``.

    The consumer takes each batch and drops it (it touches nothing), so what is timed is delivery alone. The
    consumer's CPU time (user + system) over a round divided by the round's wall time is the cores it used;
    the same over the consumer and all its child processes is the total cost of the system.
    """
    batches = stream.batches
    per_round = warm_up(batches, workload, workers)
    me = psutil.Process()
    walls: list[float] = []
    consumer_cores: list[float] = []
    total_cores: list[float] = []

    kids = children()  # workers persist: listed once, so that no listing delays a round's start

    def one_round() -> None:
        kids_before = _cpu_by_pid(kids)
        mine_before = _cpu_s(me) or 0.0
        started = time.perf_counter()
        for _ in islice(batches, per_round):
            pass
        wall = time.perf_counter() - started
        mine = (_cpu_s(me) or 0.0) - mine_before
        kids_after = _cpu_by_pid(kids)
        theirs = sum(kids_after[pid] - kids_before[pid] for pid in kids_after.keys() & kids_before.keys())
        walls.append(wall)
        consumer_cores.append(mine / wall)
        total_cores.append((mine + theirs) / wall)

    benchmark.group = workload.name
    benchmark.pedantic(one_round, rounds=workloads.ROUNDS, iterations=1, warmup_rounds=0)
    row = Row(
        workload=workload.name,
        system=system,
        workers=workers,
        unit=workload.unit,
        values=[workload.rate(per_round, wall) for wall in walls],
        consumer_cores=consumer_cores,
        total_cores=total_cores,
        batches_per_round=per_round,
        variant=variant,
        extra={**stream.info(), **(extra or {})},
    )
    benchmark.extra_info.update(
        system=system,
        workers=workers,
        variant=variant,
        unit=row.unit,
        median=row.median,
        batches_per_round=per_round,
        consumer_cores=_median_or_none(consumer_cores),
    )
    return results.add(row)


# --- the report -------------------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=BENCH_DIR, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cores": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "torch": _version("torch"),
        "multiprocess": _version("multiprocess"),
        "prefetch": f"{_version('prefetch')} (git {_git_revision()})",
        "platform": platform.platform(),
    }


def settings(results: Results) -> dict[str, Any]:
    """How the numbers were measured."""
    return {
        "quick": workloads.QUICK,
        "rounds": workloads.ROUNDS,
        "round_s": workloads.ROUND_S,
        "warmup_s": workloads.WARMUP_S,
        "cpu_work_ms_per_sample": round(workloads.CPU_REPS * workloads.REP_S * 1e3, 3),
        "light_work_ms_per_sample": round(workloads.LIGHT_REPS * workloads.REP_S * 1e3, 3),
        "blas_threads": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
        "numpy_imported_before_thread_settings": results.numpy_imported_early,
        "started": results.started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": [round(x, 2) for x in results.load_at_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }


def render_json(results: Results) -> dict[str, Any]:
    """Everything, every round included, for ``latest.json``."""
    return {
        "machine": machine(),
        "settings": settings(results),
        "rows": [row.to_dict() for row in results.rows],
        "tables": results.tables,
        "runs": results.runs,
    }


def _num(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _cores(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else ""


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table, less the columns that are empty in every row."""
    keep = [i for i in range(len(header)) if any(row[i] for row in rows)]
    header = [header[i] for i in keep]
    rows = [[row[i] for i in keep] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def _find(rows: list[Row], **want: Any) -> Row | None:
    for row in rows:
        if all(getattr(row, key) == value for key, value in want.items()):
            return row
    return None


def _sort_key(row: Row) -> tuple[Any, ...]:
    system = workloads.SYSTEMS.index(row.system) if row.system in workloads.SYSTEMS else len(workloads.SYSTEMS)
    return (system, row.variant, row.workers if row.workers is not None else -1)


def _rate_section(name: str, rows: list[Row]) -> list[str]:
    """A throughput table: each row against the plain generator, torch at the same worker count, and the
    workload's own reference (ideal scaling, memcpy, or the long epoch)."""
    workload = workloads.WORKLOADS[name]
    unit = rows[0].unit
    rows = sorted(rows, key=_sort_key)
    plain = _find(rows, system="plain")
    memcpy = _find(rows, system="memcpy")
    has_ideal = any("ideal" in row.extra for row in rows)
    is_epochs = name == "epochs"
    header = ["system", "workers"] + (["epochs"] if is_epochs else [])
    header += [f"{unit} (median)", "min-max", "vs plain", "vs torch"]
    header += ["% of ideal"] if has_ideal else []
    header += ["of memcpy"] if memcpy is not None else []
    header += ["short vs long"] if is_epochs else []
    header += ["consumer cores", "all cores", "batches/round"]
    body = []
    for row in rows:
        torch_row = _find(rows, system="torch", workers=row.workers, variant=row.variant)
        cells = [SYSTEM_LABELS.get(row.system, row.system), "-" if row.workers is None else str(row.workers)]
        cells += [row.variant] if is_epochs else []
        cells += [_num(row.median), f"{_num(min(row.values))}-{_num(max(row.values))}"]
        cells.append(_ratio(row.median / plain.median) if plain and row is not plain else "")
        cells.append(_ratio(row.median / torch_row.median) if torch_row and row is not torch_row else "")
        if has_ideal:
            ideal = row.extra.get("ideal")
            cells.append(f"{row.median / ideal:.0%}" if ideal else "")
        if memcpy is not None:
            cells.append(f"{row.median / memcpy.median:.0%}" if row is not memcpy else "")
        if is_epochs:
            long = _find(rows, system=row.system, workers=row.workers, variant=workloads.LONG_EPOCH_LABEL)
            cells.append(_ratio(row.median / long.median) if long and row is not long else "")
        cells.append(_cores(row.consumer_cores))
        cells.append(_cores(row.total_cores))
        cells.append(str(row.batches_per_round or ""))
        body.append(cells)
    return [f"### {workload.title} (`{name}`)", "", workload.about, "", *_table(header, body)]


def _startup_section(rows: list[Row]) -> list[str]:
    title, about = SECTION_TEXT["startup"]
    body = []
    for row in rows:
        reference = _find(rows, system="torch", workers=row.workers, variant=row.variant)
        vs_torch = _ratio(row.median / reference.median) if reference and row is not reference else ""
        body.append(
            [
                SYSTEM_LABELS.get(row.system, row.system),
                row.variant,
                f"{row.median:.3f}",
                f"{min(row.values):.3f}-{max(row.values):.3f}",
                vs_torch,
                str(len(row.values)),
            ]
        )
    header = ["system", "measurement", "seconds (median)", "min-max", "time / torch's", "rounds"]
    return [f"### {title}", "", about, "", *_table(header, body)]


def _free_section(section: str, rows: list[dict[str, Any]]) -> list[str]:
    title, about = SECTION_TEXT.get(section, (section, ""))
    header = list(rows[0])
    body = [[_cell(row.get(key)) for key in header] for row in rows]
    return [f"### {title}", "", about, "", *_table(header, body)]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return _num(value) if value >= 0 else f"-{_num(-value)}"
    return str(value)


def render_markdown(results: Results) -> str:
    """The report: the machine, the settings, then one table per workload."""
    info = machine()
    setup = settings(results)
    lines = ["# prefetch benchmarks", ""]
    if workloads.QUICK:
        lines += ["**QUICK MODE: a smoke run on tiny sizes, one round: the numbers mean nothing.**", ""]
    lines += [
        f"- machine: {info['cores']} usable cores, {info['cpu']}, {info['memory_gib']} GiB, {info['platform']}",
        f"- versions: python {info['python']}, numpy {info['numpy']}, torch {info['torch']}, "
        f"multiprocess {info['multiprocess']}, prefetch {info['prefetch']}",
        f"- date: {setup['started']} to {setup['finished']} (UTC); load average at start "
        f"{setup['load_average_start']}, at end {setup['load_average_end']}",
        f"- method: {setup['rounds']} timed round(s) of ~{setup['round_s']} s each after a warm-up, median and "
        f"min-max over rounds; BLAS threads {setup['blas_threads']}; cpu work {setup['cpu_work_ms_per_sample']} "
        f"ms/sample, light work {setup['light_work_ms_per_sample']} ms/sample (calibrated)",
        "- vs plain / vs torch: median throughput over the plain generator's / torch DataLoader's (numpy "
        "collate) at the same worker count; consumer cores: the consuming process's CPU time over wall time; "
        "all cores: the same with every child process (workers, coordinator) counted",
    ]
    if results.numpy_imported_early:
        lines.append("- WARNING: numpy was imported before the BLAS thread settings; BLAS may be multithreaded")
    by_workload: dict[str, list[Row]] = {}
    for row in results.rows:
        by_workload.setdefault(row.workload, []).append(row)
    sections = [s for s in SECTION_ORDER if s in by_workload or s in results.tables]
    sections += [s for s in [*by_workload, *results.tables] if s not in sections]
    for section in sections:
        lines.append("")
        if section == "startup":
            lines += _startup_section(by_workload[section])
        elif section in by_workload:
            lines += _rate_section(section, by_workload[section])
        if section in results.tables:
            if section in by_workload:
                lines.append("")
            lines += _free_section(section, results.tables[section])
    return "\n".join(lines) + "\n"


def render_plot(results: Results, path: Any) -> bool:
    """A PNG of throughput against workers for the cpu and latency workloads, one line per system.

    Needs matplotlib (the ``bench`` tox env installs it); returns False, writing nothing, without it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    workloads = [w for w in ("cpu", "latency", "overhead") if any(r.workload == w and r.workers for r in results.rows)]
    if not workloads:
        return False
    figure, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for axis, workload in zip(axes[0], workloads, strict=True):
        rows = [r for r in results.rows if r.workload == workload and r.workers and not r.variant]
        for system in sorted({r.system for r in rows}):
            points = sorted((r.workers, r.median) for r in rows if r.system == system)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=system)
        plain = next((r for r in results.rows if r.workload == workload and r.system == "plain"), None)
        if plain is not None:
            axis.axhline(plain.median, color="grey", linestyle="--", label="plain generator")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("workers")
        axis.set_ylabel(rows[0].unit if rows else "")
        axis.set_title(workload)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
