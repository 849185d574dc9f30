"""End-to-end workloads: the loader inside a training loop that itself uses the CPU.

A loader measured alone can win every benchmark and still slow training down, because the training step
runs on the same cores as the workers. Here every measurement is a training run:

* ``jpeg``: JPEG files on disk (written once by ``write_jpegs``) -> Pillow decode -> RandomResizedCrop(224)
  -> horizontal flip -> uint8 batches of 64, consumed by a small torch CNN training step (``step="default"``:
  torch's default intra-op threads; ``"1"``: ``torch.set_num_threads(1)``; ``"none"``: no step, the loader
  alone). Figure: images per second, and the time to the first batch.
* ``keras``: the seed's use case. Keras ``fit`` (torch backend) on 8x8 digits upsampled to 32x32 with a
  ~1 ms/sample numpy augmentation (pad/crop, flip, noise, blur), a small CNN, batch 32, all defaults.
  Figure: wall time per epoch.

Each run is a fresh Python process (``python e2e.py run '<json>'``), so thread settings, imports and caches of
one system never help or hurt another; ``compare`` runs the systems of one case interleaved, round after
round, and reports medians and ranges. The environment of the run is this process's, less the one-thread
settings of ``bench/conftest.py``: torch runs at its default threads as a user's script would.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from jpegs import CROP, JPEG_BATCH, JPEG_COUNT, jpeg_augment, jpeg_labels, random_resized_crop, write_jpegs  # noqa: F401

BENCH_DIR = Path(__file__).resolve().parent
# Warm-up: start-up, caches, and prefetch's measurement of the training threads (_tuning: 40 batches);
# everyone gets the same. Then the timed batches: the steady state a long training run lives in.
JPEG_WARMUP_BATCHES = 45
JPEG_TIMED_BATCHES = 20
# The training step's work: channels of the small CNN, chosen so that one step takes ~150 ms alone at
# torch's default threads on this 2-core machine, as in the measurements that opened the issue.
STEP_WIDTH = 8

KERAS_SAMPLES = 1536
KERAS_BATCH = 32
KERAS_EPOCHS = 3
KERAS_SIDE = 32

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


def run_jpeg(
    system: str,
    step: str,
    workers: int = 2,
    warmup_batches: int = JPEG_WARMUP_BATCHES,
    timed_batches: int = JPEG_TIMED_BATCHES,
    auto: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """One training run of the JPEG pipeline: images/s over the timed batches, first batch, CPU by process.
    ``auto``: prefetch with ``workers="auto"`` (then ``workers`` is ignored)."""
    if auto:
        workers, options = -1, {**options, "workers": "auto"}
    train = None
    if step != "none":
        import torch

        if step != "default":
            torch.set_num_threads(int(step))
        train = make_torch_step()
        warm = np.zeros((JPEG_BATCH, CROP, CROP, 3), np.uint8)
        train(warm, np.zeros(JPEG_BATCH, np.int64))
    started = time.perf_counter()
    batches, close = _jpeg_stream(system, workers, options)
    info: dict[str, Any] = {}
    try:
        x, y = next(batches)
        first_batch_s = time.perf_counter() - started
        for _ in range(warmup_batches - 1):
            x, y = next(batches)
            if train is not None:
                train(x, y)
        pids = [os.getpid(), *_descendants()]
        sched_before = scheduler_figures(pids)
        cpu_before = _cpu_seconds(pids)
        t0 = time.perf_counter()
        for _ in range(timed_batches):
            x, y = next(batches)
            if train is not None:
                train(x, y)
        elapsed = time.perf_counter() - t0
        cpu_after = _cpu_seconds(pids)
        sched_after = scheduler_figures(pids)
        if system.startswith("prefetch"):
            import prefetch

            loader = prefetch.Loader.of(batches)
            stats = loader.stats()
            info["stats"] = str(stats)
            info["auto_changes"] = [list(change) for change in getattr(stats, "auto_changes", ())]
            info["workers"] = loader.workers
            info["provenance"] = list(loader.config.provenance)
    finally:
        close()
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
        "consumer_cores": cores.pop(str(os.getpid()), None),
        "other_cores": sorted(cores.values(), reverse=True),
        **info,
    }


# --- the Keras fit workload ----------------------------------------------------------------------------------


def digits(count: int = KERAS_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """8x8 digit-like images (a blurred random stroke pattern per class), upsampled to 32x32 float32."""
    rng = np.random.default_rng(7)
    prototypes = rng.uniform(0, 1, (10, 8, 8)) > 0.55
    labels = rng.integers(0, 10, count)
    small = prototypes[labels].astype(np.float32) + rng.normal(0, 0.2, (count, 8, 8)).astype(np.float32)
    big = np.kron(small, np.ones((4, 4), np.float32))
    return big[..., None], labels.astype(np.int64)


def digits_augment(sample: tuple[np.ndarray, Any]) -> tuple[np.ndarray, Any]:
    """~1 ms of numpy per sample: pad and random crop, random flip, noise, a 5-tap blur in both directions."""
    image, label = sample
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    top, left = np.random.randint(0, 9), np.random.randint(0, 9)
    out = padded[top : top + KERAS_SIDE, left : left + KERAS_SIDE]
    if np.random.rand() < 0.5:
        out = out[:, ::-1]
    out = out + np.random.normal(0, 0.05, out.shape).astype(np.float32)
    kernel = np.array([1, 4, 6, 4, 1], np.float32) / 16
    for _ in range(12):
        out = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), 0, out)
    return np.ascontiguousarray(out, dtype=np.float32), label


def run_keras(system: str, threads: str = "default", **options: Any) -> dict[str, Any]:
    """``model.fit`` for KERAS_EPOCHS epochs on the digits, fed by the seed's generator or ``data_generator``."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    import torch

    if threads != "default":
        torch.set_num_threads(int(threads))
    x, y = digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((KERAS_SIDE, KERAS_SIDE, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    epoch_ends: list[float] = []
    threads_at_epoch_end: list[int] = []  # the training thread's intra-op threads, as prefetch may tune them

    class Clock(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            epoch_ends.append(time.perf_counter())
            threads_at_epoch_end.append(torch.get_num_threads())

    steps = KERAS_SAMPLES // KERAS_BATCH
    started = time.perf_counter()
    if system == "plain":
        random.seed(0)
        np.random.seed(0)
        gen = plain_generator(KERAS_BATCH, x, y, digits_augment)
        close = gen.close
    else:
        import prefetch

        gen = prefetch.data_generator(KERAS_BATCH, x, y, shuffle=True, seed=0, transform=digits_augment, **options)
        close = gen.close
    info: dict[str, Any] = {}
    try:
        model.fit(gen, steps_per_epoch=steps, epochs=KERAS_EPOCHS, verbose=0, callbacks=[Clock()])
        if system != "plain":
            info["decisions"] = list(prefetch.Loader.of(gen).stats().decisions)
    finally:
        close()
    total = time.perf_counter() - started
    epochs = [b - a for a, b in zip([started, *epoch_ends], epoch_ends)]
    return {
        "s_per_epoch": total / KERAS_EPOCHS,
        "epoch_s": [round(e, 3) for e in epochs],
        "total_s": total,
        "threads": threads_at_epoch_end,
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

    A case with ``"tree": PATH`` runs that checkout's own ``bench/e2e.py`` with its ``prefetch`` first on the
    path: the code before a change, measured in the same rounds as the code after it. ``prefix`` goes before
    the command: what confines the run (``container.py``: a cgroup, ``taskset``)."""
    case = dict(case)
    tree = case.pop("tree", None)
    env = training_env()
    script = Path(__file__)
    if tree is not None:
        script = Path(tree) / "bench" / "e2e.py"
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
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
    return json.loads(done.stdout.strip().splitlines()[-1])


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


def paired_ratio(runs: list[dict[str, Any]], base: list[dict[str, Any]], key: str) -> float:
    """The median over rounds of ``run[key] / base[key]`` within each round: on a machine whose speed drifts
    between rounds, systems compared inside a round say more than a ratio of medians does."""
    return statistics.median(a[key] / b[key] for a, b in zip(runs, base, strict=True))


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


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
