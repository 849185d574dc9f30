"""End-to-end workloads: the loader inside a training loop that itself uses the CPU.

A loader measured alone can win every benchmark and still slow training down, because the training step
runs on the same cores as the workers. Here every measurement is a training run:

* ``jpeg``: JPEG files on disk (written once by ``write_jpegs``) -> Pillow decode -> RandomResizedCrop(224)
  -> horizontal flip -> uint8 batches of 64, consumed by a small torch CNN training step (``step="default"``:
  torch's default intra-op threads; ``"1"``: ``torch.set_num_threads(1)``; ``"tiny"``: one linear layer, a
  data-bound loop; ``"none"``: no step, the loader alone). Figure: images per second over the timed batches,
  the time to the first batch, and every batch's time, from which ``e2e_figures.steady_state_batch`` finds
  how many batches the run took to settle (prefetch's tuning included).
* ``keras``: the seed's use case, Keras ``fit`` on augmented digits (``e2e_keras.py``). Figure: wall time per
  epoch.

Each run is a fresh Python process (``python e2e.py run '<json>'``), so thread settings, imports and caches of
one system never help or hurt another; ``compare`` runs the systems of one case interleaved, round after
round, and reports medians and ranges. The environment of the run is this process's, less the one-thread
settings of ``bench/conftest.py``: torch runs at its default threads as a user's script would.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from e2e_figures import bench_rounds, paired_ratio, paired_ratios, steady_state_batch, summary  # noqa: F401  (e2e.paired_ratio)
from e2e_keras import KERAS_BATCH, KERAS_EPOCHS, KERAS_SAMPLES, KERAS_SIDE, digits, digits_augment, run_keras  # noqa: F401
from jpegs import CROP, JPEG_BATCH, JPEG_COUNT, jpeg_augment, jpeg_labels, random_resized_crop, write_jpegs  # noqa: F401

BENCH_DIR = Path(__file__).resolve().parent
# Warm-up: start-up, caches, and prefetch's first verdicts (the training threads' tuner gives its first at
# batch 76 when the two settings differ clearly, at 196 at the latest; worker_nice="auto" steps back after 28;
# workers="auto", the default, may time a park until batch 300: its cost falls in the timed batches, as it
# would in a user's run); everyone gets the same. Then the timed batches: the steady state a long training run
# lives in. The tables' "steady after" and "decided at" columns say whether a run settled inside the warm-up.
# A smoke run (``BENCH_QUICK=1``) takes 10 + 10: it checks that the runs work, its figures mean nothing.
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
JPEG_WARMUP_BATCHES = 10 if QUICK else 120
JPEG_TIMED_BATCHES = 10 if QUICK else 30
# The time limit of one comparison (a pytest timeout, against hangs): rounds x systems x this per run (a run
# takes 20-40 s on a quiet 2-core machine; each run also has run_in_fresh_process's own limit).
RUN_LIMIT_S = 240


def comparison_timeout_s(rounds: int, systems: int = 8) -> int:
    """A pytest time limit for ``compare`` over ``rounds`` rounds of up to ``systems`` systems."""
    return rounds * systems * RUN_LIMIT_S


# The training step's work: channels of the small CNN, chosen so that one step takes ~150 ms alone at
# torch's default threads on this 2-core machine, as in the measurements that opened the issue.
STEP_WIDTH = 8

# The variables bench/conftest.py sets to one thread; a training run gets the user's defaults back.
ONE_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# --- the JPEG pipeline -------------------------------------------------------------------------------------


def make_torch_step(width: int = STEP_WIDTH) -> Any:
    """A small CNN and its SGD step on a uint8 NHWC batch: the CPU-bound training step of the loop."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, width, 5, stride=2),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()

    def step(x: Any, y: Any) -> float:
        images = torch.as_tensor(x).permute(0, 3, 1, 2).float().div_(255)
        labels = torch.as_tensor(y)
        optimizer.zero_grad()
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


# --- the seed's generator (the plain baseline) ---------------------------------------------------------------


def plain_generator(batch_size: int, data_x: Any, data_y: Any, transform: Any, shuffle: bool = True) -> Any:
    """The seed's generator with the per-sample work inside its loop, as a user writes it (the demo's copy,
    which ``workloads.plain_generator`` uses too)."""
    from prefetch.demo import plain_data_generator

    return plain_data_generator(batch_size, data_x, data_y, shuffle=shuffle, transform=transform)


# --- one run, in this process --------------------------------------------------------------------------------


def _cpu_seconds(pids: list[int]) -> dict[int, float]:
    import psutil

    out = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            out[pid] = times.user + times.system
        except psutil.Error:
            pass
    return out


def scheduler_figures(pids: list[int]) -> dict[int, list[float]]:
    """Per process, summed over its threads: [CPU s, run-queue wait s, voluntary, involuntary switches].

    From Linux's ``/proc/PID/task/TID/schedstat`` (ns on CPU, ns waiting runnable) and ``status``: how long
    each process was ready to run but waited for a core, and how often it gave the core up or lost it.
    """
    figures: dict[int, list[float]] = {}
    for pid in pids:
        total = [0.0, 0.0, 0.0, 0.0]
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    on_cpu, waiting, _ = f.read().split()
                total[0] += int(on_cpu) / 1e9
                total[1] += int(waiting) / 1e9
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches"):
                            total[2] += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches"):
                            total[3] += int(line.split()[1])
        except (OSError, ValueError):
            continue
        figures[pid] = total
    return figures


def _descendants() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


def _jpeg_stream(system: str, workers: int, options: dict[str, Any]) -> tuple[Any, Any]:
    """``(batches, closer)`` of ``system`` over the JPEG files (or, for ``e2e_shards.SYSTEMS``, tar shards of them)."""
    if system in ("prefetch-tar", "webdataset"):
        import e2e_shards

        return e2e_shards.shard_stream(system, workers, options)
    if system.startswith("prefetch-split") or system.startswith("prefetch-cache"):
        import cache_jpegs

        return cache_jpegs.cache_stream(system, workers, options)
    paths = write_jpegs()
    labels = jpeg_labels(len(paths))
    if system == "plain":
        random.seed(0)
        gen = plain_generator(JPEG_BATCH, paths, labels, jpeg_augment)
        return gen, gen.close
    if system == "torch":
        import torch
        from torch.utils.data import DataLoader, Dataset

        class Files(Dataset):  # type: ignore[misc]
            def __len__(self) -> int:
                return len(paths)

            def __getitem__(self, i: int) -> Any:
                return jpeg_augment((paths[i], int(labels[i])))

        generator = torch.Generator()
        generator.manual_seed(0)
        loader = DataLoader(
            Files(),
            batch_size=JPEG_BATCH,
            shuffle=True,
            num_workers=workers,
            generator=generator,
            persistent_workers=workers > 0,  # DataLoader refuses it without workers (its default, 0)
        )

        def endless() -> Any:
            while True:
                yield from loader

        gen = endless()
        return gen, gen.close
    if system == "prefetch":
        import prefetch

        if workers >= 0:
            options = {"workers": workers, **options}
        loader = prefetch.Loader(paths, labels, batch_size=JPEG_BATCH, seed=0, transform=jpeg_augment, **options)
        gen = loader.stream()

        def close() -> None:
            gen.close()
            loader.close()

        return gen, close
    raise ValueError(f"unknown system {system!r}")


def make_tiny_step() -> Any:
    """The data-bound loop's step (``step="tiny"``): SGD on one linear layer over an 8x8 average-pooled image,
    a few ms on a batch of 64 -- a loop whose time goes to preprocessing, not to training."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()

    def step(x: Any, y: Any) -> float:
        images = torch.as_tensor(x).permute(0, 3, 1, 2).float()
        optimizer.zero_grad()
        loss = loss_fn(model(images), torch.as_tensor(y))
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def _training_step(step: str) -> Any:
    """The step of ``run_jpeg``'s loop, warmed once (None for ``step="none"``, the loader alone)."""
    if step == "none":
        return None
    import torch

    if step not in ("default", "tiny"):
        torch.set_num_threads(int(step))
    train = make_tiny_step() if step == "tiny" else make_torch_step()
    train(np.zeros((JPEG_BATCH, CROP, CROP, 3), np.uint8), np.zeros(JPEG_BATCH, np.int64))
    return train


class _Decisions:
    """After which batch the engine's decisions (``stats().decisions``: worker priority, the training threads'
    tuner) last changed: polled after every batch, at the cost of a tuple of strings."""

    def __init__(self, batches: Any, system: str):
        self.loader = None
        if system.startswith("prefetch"):
            import prefetch

            self.loader = prefetch.Loader.of(batches)
        self.last: tuple[str, ...] = ()
        self.at = 0

    def poll(self, taken: int) -> None:
        engine = None if self.loader is None else self.loader.engine
        made = tuple(getattr(engine, "decisions", tuple)())
        if made != self.last:
            self.last, self.at = made, taken


def run_jpeg(
    system: str,
    step: str,
    workers: int = 2,
    warmup_batches: int = JPEG_WARMUP_BATCHES,
    timed_batches: int = JPEG_TIMED_BATCHES,
    auto: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """One training run of the JPEG pipeline: images/s over the timed batches, first batch, every batch's
    time (start-up in the first), the batches before the steady state, CPU by process. ``auto``: prefetch with
    ``workers="auto"`` (then ``workers`` is ignored)."""
    if auto:
        workers, options = -1, {**options, "workers": "auto"}
    train = _training_step(step)
    started = time.perf_counter()
    batches, close = _jpeg_stream(system, workers, options)
    ends: list[float] = []
    info: dict[str, Any] = {}
    try:
        decisions = _Decisions(batches, system)
        for taken in range(warmup_batches + timed_batches):
            if taken == warmup_batches:
                pids = [os.getpid(), *_descendants()]
                sched_before, cpu_before = scheduler_figures(pids), _cpu_seconds(pids)
                t0 = time.perf_counter()
            x, y = next(batches)
            if taken == 0:
                first_batch_s = time.perf_counter() - started  # to holding batch 0, before its step
            if train is not None:
                train(x, y)
            ends.append(time.perf_counter())
            decisions.poll(taken + 1)
        elapsed = time.perf_counter() - t0
        cpu_after, sched_after = _cpu_seconds(pids), scheduler_figures(pids)
        if decisions.loader is not None:
            loader = decisions.loader
            stats = loader.stats()
            info.update(stats=str(stats), workers=loader.workers, decisions=list(decisions.last))
            info["auto_changes"] = [list(change) for change in getattr(stats, "auto_changes", ())]
            info.update(provenance=list(loader.config.provenance), decided_at_batch=decisions.at)
    finally:
        close()
    batch_s = [b - a for a, b in zip([started, *ends], ends)]
    cores = {str(pid): round((cpu_after[pid] - cpu_before.get(pid, 0.0)) / elapsed, 3) for pid in cpu_after}
    per_batch = {  # per timed batch: ms on CPU, ms waiting for a core, voluntary and involuntary switches
        "consumer" if pid == os.getpid() else str(pid): [
            round((after - before) / timed_batches * (1e3 if k < 2 else 1), 1)
            for k, (after, before) in enumerate(zip(sched_after[pid], sched_before[pid]))
        ]
        for pid in sched_after
        if pid in sched_before
    }
    return {
        "sched_per_batch": per_batch,
        "images_per_s": timed_batches * JPEG_BATCH / elapsed,
        "first_batch_s": first_batch_s,
        "batch_s": [round(t, 4) for t in batch_s],
        "steady_batches": steady_state_batch(batch_s, tail=timed_batches),
        "consumer_cores": cores.pop(str(os.getpid()), None),
        "other_cores": sorted(cores.values(), reverse=True),
        **info,
    }


# --- runs in fresh processes, interleaved --------------------------------------------------------------------


def training_env() -> dict[str, str]:
    """This process's environment less the bench's one-thread settings: a user's script's defaults."""
    env = {k: v for k, v in os.environ.items() if k not in ONE_THREAD_VARS}
    env["KERAS_BACKEND"] = "torch"
    return env


def run_in_fresh_process(case: dict[str, Any], timeout_s: float = 600, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run one case (``{"workload": ..., "system": ..., ...}``) in a new interpreter; its result.

    A case with ``"tree": PATH`` runs this harness with that checkout's ``prefetch`` first on the path: the
    code before a change, measured in the same rounds, windows and workloads as the code after it (only the
    library differs). ``prefix`` goes before the command: what confines the run (``container.py``: a cgroup,
    ``taskset``)."""
    case = dict(case)
    tree = case.pop("tree", None)
    env = training_env()
    script = Path(__file__)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    started = time.perf_counter()
    done = subprocess.run(
        [*prefix, sys.executable, str(script), "run", json.dumps(case)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"case {case} failed with code {done.returncode}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started  # the whole run, interpreter and imports included
    return dict(result)


def compare(
    cases: dict[str, dict[str, Any]], rounds: int, prefix: tuple[str, ...] = ()
) -> dict[str, list[dict[str, Any]]]:
    """Run every case once per round, interleaved (a, b, c, a, b, c, ...): their results by label. ``prefix``:
    see ``run_in_fresh_process``."""
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in cases}
    for round_number in range(rounds):
        labels = list(cases)
        if round_number % 2:
            labels.reverse()  # neither system always runs first, on a warmer page cache
        for label in labels:
            results[label].append(run_in_fresh_process(cases[label], prefix=prefix))
    return results


def baseline_tree() -> str | None:
    """``BENCH_BASELINE_TREE``: a checkout of the code before a change, run as one more system (see
    ``run_in_fresh_process``), or None."""
    tree = os.environ.get("BENCH_BASELINE_TREE")
    if tree and not (Path(tree) / "prefetch" / "__init__.py").exists():
        raise RuntimeError(f"BENCH_BASELINE_TREE={tree!r} is not a prefetch checkout")
    return tree or None


def main(argv: list[str]) -> None:
    if len(argv) >= 2 and argv[0] == "run":
        case = json.loads(argv[1])
        workload = case.pop("workload")
        result = run_jpeg(**case) if workload == "jpeg" else run_keras(**case)
        print(json.dumps(result))
        return
    raise SystemExit("usage: e2e.py run '<json case>'")


if __name__ == "__main__":
    main(sys.argv[1:])
