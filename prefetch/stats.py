"""Figures collected along the data path, and the report ``loader.stats()`` returns.

The question they answer: *is my training loop starved, and would more workers
help?* ``wait_fraction`` is the share of the consumer's wall time spent inside
``next()`` waiting for a batch (the data stall). If it is high and the workers are
busy nearly all the time, more workers (or cheaper transforms) help; if it is high
but the workers idle, the bound is elsewhere (``prefetch`` depth, the source).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .core.pipeline import Timings

USS_NOTE = (
    "(rss counts shared pages -- libraries, slots, sources -- in every process that maps them; uss_total "
    "counts each process's own pages once, so it can be below one process's rss)"
)


@dataclass(frozen=True)
class Stats:
    """A snapshot of a loader's figures since its current iteration started."""

    batches: int
    samples: int
    elapsed_s: float
    batches_per_s: float
    samples_per_s: float
    wait_fraction: float  # share of elapsed time the consumer waited for data
    worker_busy: dict[int, float]  # pid -> share of elapsed time spent making batches
    load_s: float  # mean seconds per batch, by stage
    transform_s: float
    collate_s: float
    transfer_s: float
    mean_fill: float  # ready batches waiting in the consumer when one was asked for
    max_fill: int
    restarts: int  # workers that died and were replaced
    hedges: int = 0  # late batches a second worker was set to make (``hedge=True``)
    hedged_reads: int = 0  # late reads a worker started a second time (``hedge=True``, ``core/readahead``)
    # role ("consumer", "coordinator", "worker <pid>") -> RSS bytes; and "uss_total", memory unique to
    # any of these processes (shared pages counted once), where the system lets us read it
    memory: dict[str, int] = field(default_factory=dict)
    # Sharing the cores with the training step (see ``_tuning``): cores this process may use, CPU seconds
    # per wall second of the consumer's process (the training step and its threads included) and of the
    # workers together, the consumer's OS threads, and what the engine decided about them and why.
    cores: int = 0
    consumer_cpu: float = 0.0
    workers_cpu: float = 0.0
    consumer_threads: int = 0
    decisions: tuple[str, ...] = ()
    # pid -> the node each worker runs on, for executors with nodes (Ray: the node id); empty otherwise.
    # Memory and CPU figures cover the workers on this machine only.
    worker_nodes: dict[int, str] = field(default_factory=dict)
    # When these figures start (``time.time()``): the iteration's start for ``stats()``, so two snapshots
    # with the same ``started_at`` belong to the same iteration and ``later.since(earlier)`` can subtract
    # them; a window made by ``since`` starts where ``earlier`` ended.
    started_at: float = 0.0
    # Where the loader's workers and prefetch came from, one sentence each (``LoaderConfig.provenance``):
    # the CPUs this rank may use, the per-worker depth and the byte budget (``_budget``).
    provenance: tuple[str, ...] = ()
    # workers="auto" (0 and () otherwise): the workers given tasks now, the window now, and every change it
    # made as (batches the loop had taken, workers, window); the last one's batch is when it settled.
    auto_workers: int = 0
    auto_window: int = 0
    auto_changes: tuple[tuple[int, int, int], ...] = ()

    @property
    def contention(self) -> str | None:
        """Whether the training step and the workers compete for the cores, in words (None: they don't)."""
        from ._tuning import contention

        return contention(self.cores, self.consumer_cpu, self.workers_cpu, self.wait_fraction, self.consumer_threads)

    def since(self, earlier: Stats) -> Stats:
        """The figures between ``earlier`` and this snapshot: an epoch's, a measurement window's.

        Both must come from ``stats()`` of the same iteration (the same ``started_at``); if the loader
        started a new iteration in between, its figures already start after ``earlier`` and this
        snapshot is returned unchanged. Rates, shares and means are recomputed over the window from
        the cumulative figures; ``max_fill``, ``memory``, ``cores``, ``consumer_threads``,
        ``decisions`` and ``provenance`` are this snapshot's.
        """
        if earlier.started_at != self.started_at or earlier.elapsed_s > self.elapsed_s:
            return self
        elapsed = max(self.elapsed_s - earlier.elapsed_s, 1e-9)
        batches = self.batches - earlier.batches
        samples = self.samples - earlier.samples

        def share(now: float, before: float) -> float:  # of the window's wall time, from two shares
            return min(1.0, max(0.0, (now * self.elapsed_s - before * earlier.elapsed_s) / elapsed))

        def per_second(now: float, before: float) -> float:  # e.g. CPU seconds per wall second
            return max(0.0, (now * self.elapsed_s - before * earlier.elapsed_s) / elapsed)

        def mean(now: float, before: float) -> float:  # per batch delivered in the window
            return max(0.0, (now * self.batches - before * earlier.batches) / batches) if batches else 0.0

        return replace(
            self,
            batches=batches,
            samples=samples,
            elapsed_s=elapsed,
            batches_per_s=batches / elapsed,
            samples_per_s=samples / elapsed,
            wait_fraction=share(self.wait_fraction, earlier.wait_fraction),
            worker_busy={pid: share(busy, earlier.worker_busy.get(pid, 0.0)) for pid, busy in self.worker_busy.items()},
            load_s=mean(self.load_s, earlier.load_s),
            transform_s=mean(self.transform_s, earlier.transform_s),
            collate_s=mean(self.collate_s, earlier.collate_s),
            transfer_s=mean(self.transfer_s, earlier.transfer_s),
            mean_fill=mean(self.mean_fill, earlier.mean_fill),
            restarts=self.restarts - earlier.restarts,
            hedges=self.hedges - earlier.hedges,
            hedged_reads=self.hedged_reads - earlier.hedged_reads,
            consumer_cpu=per_second(self.consumer_cpu, earlier.consumer_cpu),
            workers_cpu=per_second(self.workers_cpu, earlier.workers_cpu),
            started_at=self.started_at + earlier.elapsed_s,
        )

    @property
    def idle_loop(self) -> bool:
        """True when the loop did (almost) no work between batches -- no training step -- so the time it
        waited for data is the loader's full speed being measured, not a stall (as ``contention`` says)."""
        from ._tuning import IDLE_CONSUMER_CORES, WAITING_SHARE

        return self.cores > 0 and self.consumer_cpu < IDLE_CONSUMER_CORES and self.wait_fraction >= WAITING_SHARE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        busy = ", ".join(f"{share:.0%}" for share in self.worker_busy.values()) or "-"
        memory = ", ".join(f"{role} {size / 2**20:.0f} MiB" for role, size in self.memory.items()) or "-"
        waiting = " (no training step in the loop: not a stall, see the note)" if self.idle_loop else ""
        rows = [
            ("batches / samples", f"{self.batches} / {self.samples}"),
            ("throughput", f"{self.batches_per_s:.1f} batches/s, {self.samples_per_s:.0f} samples/s"),
            ("waiting for data", f"{self.wait_fraction:.1%} of {self.elapsed_s:.2f} s{waiting}"),
            ("worker busy", busy),
            (
                "per batch",
                f"load {self.load_s * 1e3:.2f} ms, transform {self.transform_s * 1e3:.2f} ms, "
                f"collate {self.collate_s * 1e3:.2f} ms, transfer {self.transfer_s * 1e3:.2f} ms",
            ),
            ("buffer fill", f"mean {self.mean_fill:.1f}, max {self.max_fill}"),
            (
                "worker restarts",
                str(self.restarts)
                + (f", {self.hedges} late batches hedged" if self.hedges else "")
                + (f", {self.hedged_reads} late reads hedged" if self.hedged_reads else ""),
            ),
            ("memory", memory),
            (
                "cpu",
                f"loop {self.consumer_cpu:.2f} cores ({self.consumer_threads} "
                f"thread{'s' * (self.consumer_threads != 1)}), "
                f"workers {self.workers_cpu:.2f} cores, of {self.cores} usable",
            ),
        ]
        if self.worker_nodes:
            per_node: dict[str, int] = {}
            for node in self.worker_nodes.values():
                per_node[node] = per_node.get(node, 0) + 1
            rows.append(("worker nodes", ", ".join(f"{node[:12]}: {n}" for node, n in sorted(per_node.items()))))
        rows += [("sized", line) for line in self.provenance]
        if self.auto_workers:
            changes = ", ".join(f"{w} workers/window {p} at batch {b}" for b, w, p in self.auto_changes) or "none"
            rows.append(("auto", f"{self.auto_workers} workers, window {self.auto_window}; changes: {changes}"))
        rows += [("decided", decision) for decision in self.decisions]
        note = self.contention
        if note is not None:
            rows.append(("note", note))
        if "uss_total" in self.memory:
            rows.append(("", USS_NOTE))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


class StatsRecorder:
    """Accumulates figures on the consumer side; cheap enough for every batch."""

    def __init__(self, provenance: tuple[str, ...] = ()) -> None:
        self.provenance = provenance  # the loader's ``config.provenance``, shown with every snapshot
        self.started = time.perf_counter()
        self.batches = 0
        self.samples = 0
        self.wait_s = 0.0
        self.busy_s: dict[int, float] = defaultdict(float)
        self.stage_s = Timings()  # summed over the batches delivered
        self.fill_sum = 0
        self.fill_max = 0
        self.restarts = 0
        self.hedges = 0
        self.hedged_reads = 0
        self.cpu_started = time.process_time()  # this process's CPU, every thread of it
        self.started_at = time.time()  # identifies the iteration (``Stats.since``)
        # (perf_counter, process_time) when the engine was kept between epochs: the clocks stop there
        self.paused: tuple[float, float] | None = None

    def delivered(self, samples: int, waited_s: float, fill: int, timings: Timings | None, pid: int | None) -> None:
        self.batches += 1
        self.samples += samples
        self.wait_s += waited_s
        self.fill_sum += fill
        self.fill_max = max(self.fill_max, fill)
        if timings is not None:
            total = self.stage_s
            self.stage_s = Timings(  # per batch: four additions, no generator
                total.load + timings.load,
                total.transform + timings.transform,
                total.collate + timings.collate,
                total.transfer + timings.transfer,
            )
            if pid is not None:
                self.busy_s[pid] += sum(timings)

    def snapshot(
        self,
        worker_pids: list[int],
        coordinator_pid: int | None,
        decisions: tuple[str, ...] = (),
        nodes: dict[int, str] | None = None,
    ) -> Stats:
        """The figures now. ``worker_pids`` are the workers on this machine (memory, CPU); ``nodes`` maps
        every worker that has a node to it, on this machine or not (all count in ``worker_busy``)."""
        from ._budget import process_cpus

        now, cpu_now = self.paused or (time.perf_counter(), time.process_time())
        elapsed = max(now - self.started, 1e-9)
        per_batch = Timings(*(total / self.batches if self.batches else 0.0 for total in self.stage_s))
        nodes = dict(nodes or {})
        busy = {pid: min(1.0, self.busy_s.get(pid, 0.0) / elapsed) for pid in [*worker_pids, *nodes]}
        for pid, seconds in self.busy_s.items():  # workers that were replaced still count
            busy.setdefault(pid, min(1.0, seconds / elapsed))
        return Stats(
            batches=self.batches,
            samples=self.samples,
            elapsed_s=elapsed,
            batches_per_s=self.batches / elapsed,
            samples_per_s=self.samples / elapsed,
            wait_fraction=min(1.0, self.wait_s / elapsed),
            worker_busy=busy,
            load_s=per_batch.load,
            transform_s=per_batch.transform,
            collate_s=per_batch.collate,
            transfer_s=per_batch.transfer,
            mean_fill=self.fill_sum / self.batches if self.batches else 0.0,
            max_fill=self.fill_max,
            restarts=self.restarts,
            hedges=self.hedges,
            hedged_reads=self.hedged_reads,
            memory=_memory(worker_pids, coordinator_pid),
            cores=process_cpus(),
            consumer_cpu=(cpu_now - self.cpu_started) / elapsed,
            workers_cpu=_cpu_seconds(worker_pids) / elapsed,
            consumer_threads=_thread_count(),
            decisions=decisions,
            worker_nodes=nodes,
            started_at=self.started_at,
            provenance=self.provenance,
        )


def _cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _thread_count() -> int:
    """OS threads of this process (the training framework's pools included, which ``threading`` misses)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # pragma: no cover - not Linux
        import threading

        return threading.active_count()


def _memory(worker_pids: list[int], coordinator_pid: int | None) -> dict[str, int]:
    import psutil  # lazily: `import prefetch` stays fast

    roles = [("consumer", os.getpid())]
    if coordinator_pid is not None:
        roles.append(("coordinator", coordinator_pid))
    roles += [(f"worker {pid}", pid) for pid in worker_pids]
    memory: dict[str, int] = {}
    uss_total: int | None = 0
    for role, pid in roles:
        try:
            process = psutil.Process(pid)
            memory[role] = process.memory_info().rss
        except psutil.Error:
            continue
        try:  # USS counts each page once, not once per process that maps it (as RSS does)
            uss_total = None if uss_total is None else uss_total + process.memory_full_info().uss
        except (psutil.Error, AttributeError):
            uss_total = None
    if uss_total:
        memory["uss_total"] = uss_total
    return memory
