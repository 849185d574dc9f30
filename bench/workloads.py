"""What the benchmarks feed through every system: the data, the per-sample work, and one stream per system.

A *workload* is a data set (``x`` samples and integer ``y`` labels), a per-sample ``transform`` and a batch
size. A *system* is what turns it into an endless stream of ``(batch_x, batch_y)`` numpy batches:

* ``plain``        the seed's ``data_generator``, with the transform applied inline and numpy stacking;
* ``memcpy``       not a loader: one ``np.copyto`` of a batch's bytes per "batch" (a bandwidth ceiling);
* ``pool``         the roll-your-own baseline, ``multiprocess.Pool.imap`` over index batches;
* ``torch``        PyTorch ``DataLoader`` with a numpy collate (``torch-tensor``: its default tensor collate);
* ``prefetch``     ``prefetch.Loader``.

Every function here lives at module level so that worker processes, forked or spawned, can import or pickle
it. Nothing heavy happens at import: data sets are built on first use (once per process), and torch is only
imported by the torch baseline. Sizes shrink when ``BENCH_QUICK=1`` (a smoke run whose numbers mean nothing).
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

Sample = tuple[Any, Any]
Batch = tuple[Any, Any]

# --- run size ---------------------------------------------------------------------------------------------

QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
# Timed rounds per measurement; the median and the min-max over them are reported.
ROUNDS = 1 if QUICK else 5
# Target wall time of one timed round: the batch count per round is set from the warm-up rate to reach it.
ROUND_S = 0.1 if QUICK else 1.0
# Warm-up after the first 2*workers+2 batches, also used to estimate the rate.
WARMUP_S = 0.05 if QUICK else 0.3
MIN_BATCHES_PER_ROUND = 3 if QUICK else 10
MAX_BATCHES_PER_ROUND = 20_000
# Fresh subprocesses per start-up measurement (import time, time to first batch).
STARTUP_ROUNDS = 2 if QUICK else 5

# --- the per-sample work ----------------------------------------------------------------------------------

CPU_WORK_S = 1e-3  # the cpu workload's work per sample
LIGHT_WORK_S = 1e-4  # the epochs workload's work per sample
LATENCY_S = 0.002  # the latency workload's wait per sample
_KERNEL_SIDE = 64
_KERNEL_W = np.random.default_rng(12345).standard_normal((_KERNEL_SIDE, _KERNEL_SIDE)) / 8.0
_SCRATCH = np.random.default_rng(54321).standard_normal((_KERNEL_SIDE, _KERNEL_SIDE))


def burn(a: np.ndarray, reps: int) -> np.ndarray:
    """Single-threaded CPU work: ``reps`` times a 64x64 float64 matmul and a tanh (BLAS is pinned to 1 thread)."""
    for _ in range(reps):
        a = np.tanh(a @ _KERNEL_W)
    return a


def _calibrate_rep_s() -> float:
    """Seconds of one ``burn`` repetition on this machine: the best of a few tries, so a busy machine
    (another process running) does not inflate it."""
    best = math.inf
    for _ in range(7):
        started = time.perf_counter()
        burn(_SCRATCH, 40)
        best = min(best, (time.perf_counter() - started) / 40)
    return best


# Calibrated once per run: the first process to import this module measures it and leaves it in the
# environment, so subprocesses and spawned workers inherit the same figure instead of re-measuring.
REP_S = float(os.environ.get("BENCH_REP_S") or _calibrate_rep_s())
os.environ["BENCH_REP_S"] = repr(REP_S)
CPU_REPS = max(1, round(CPU_WORK_S / REP_S))
LIGHT_REPS = max(1, round(LIGHT_WORK_S / REP_S))


def cpu_transform(sample: Sample) -> Sample:
    """~1 ms of single-threaded numpy work computed from the sample (64x64 float32 in, 64x64 float32 out)."""
    x, y = sample
    return burn(x.astype(np.float64), CPU_REPS).astype(np.float32), y


def sleep_transform(sample: Sample) -> Sample:
    """2 ms of waiting (as a read from disk or network would), no CPU."""
    time.sleep(LATENCY_S)
    return sample


def copy_transform(sample: Sample) -> Sample:
    """A copy of the image: the least a real image transform does."""
    x, y = sample
    return np.array(x, copy=True), y


def identity(sample: Sample) -> Sample:
    """No work at all: what is left is the per-batch cost of the machinery."""
    return sample


def light_transform(sample: Sample) -> Sample:
    """~0.1 ms of CPU work that leaves the sample unchanged."""
    burn(_SCRATCH, LIGHT_REPS)
    return sample


# --- the workloads ----------------------------------------------------------------------------------------


def _labelled(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return x, np.random.default_rng(seed).integers(0, 10, len(x), dtype=np.int64)


def _cpu_data() -> tuple[np.ndarray, np.ndarray]:
    n = 256 if QUICK else 4096
    return _labelled(np.random.default_rng(1).standard_normal((n, 64, 64), dtype=np.float32), 1)


def _latency_data() -> tuple[np.ndarray, np.ndarray]:
    return _labelled(np.arange(4096 * 4, dtype=np.float32).reshape(-1, 4), 2)


def _bigarray_data() -> tuple[np.ndarray, np.ndarray]:
    n = 128 if QUICK else 256
    return _labelled(np.random.default_rng(3).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8), 3)


def _overhead_data() -> tuple[np.ndarray, np.ndarray]:
    return _labelled(np.random.default_rng(4).standard_normal((65536, 4), dtype=np.float32), 4)


# The epochs workload: the same tiny samples, in 16-batch epochs or in one epoch longer than the whole run.
SHORT_EPOCH_BATCHES = 16
LONG_EPOCH_BATCHES = 10_000
SHORT_EPOCH_LABEL = f"{SHORT_EPOCH_BATCHES}-batch epochs"
LONG_EPOCH_LABEL = f"one {LONG_EPOCH_BATCHES}-batch epoch"


@cache
def epoch_data(batches_per_epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Tiny samples, exactly ``batches_per_epoch`` batches of 32 per epoch."""
    n = batches_per_epoch * 32
    return _labelled(np.random.default_rng(5).standard_normal((n, 4), dtype=np.float32), 5)


@dataclass(frozen=True)
class Workload:
    """A data set, the work per sample, a batch size and the unit its throughput is reported in."""

    name: str
    title: str
    about: str
    batch_size: int
    transform: Callable[[Sample], Sample]
    make_data: Callable[[], tuple[np.ndarray, np.ndarray]] = field(repr=False)
    unit: str  # "samples/s", "GB/s" or "batches/s"
    sample_shape: tuple[int, ...]  # of a transformed x sample

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        """The workload's ``(x, y)``, built on first use and kept for the process's life."""
        return _data(self.name)

    @property
    def batch_bytes(self) -> int:
        """Bytes of one batch's x (the labels' few hundred bytes are left out)."""
        x, _ = self.data()
        return self.batch_size * math.prod(self.sample_shape) * x.dtype.itemsize

    def rate(self, batches: int, seconds: float) -> float:
        """Throughput of ``batches`` batches delivered in ``seconds``, in ``self.unit``."""
        if self.unit == "samples/s":
            return batches * self.batch_size / seconds
        if self.unit == "GB/s":
            return batches * self.batch_bytes / seconds / 1e9
        return batches / seconds

    def check(self, batch: Batch) -> None:
        """A delivered batch has the workload's shape (every system must deliver the same arrays)."""
        x, y = batch
        assert tuple(x.shape) == (self.batch_size, *self.sample_shape), (tuple(x.shape), self.sample_shape)
        assert y is None or tuple(y.shape) == (self.batch_size,), tuple(y.shape)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "cpu",
            "CPU-bound preprocessing",
            f"~{CPU_WORK_S * 1e3:g} ms of single-threaded numpy work per sample (64x64 float32), batch 32. "
            "Expect scaling with processes up to the cores available.",
            32,
            cpu_transform,
            _cpu_data,
            "samples/s",
            (64, 64),
        ),
        Workload(
            "latency",
            "Latency-bound loading",
            f"`time.sleep({LATENCY_S})` per sample, trivial data, batch 32. Ideal = workers / {LATENCY_S * 1e3:g} ms "
            "samples/s: expect scaling far beyond the cores.",
            32,
            sleep_transform,
            _latency_data,
            "samples/s",
            (4,),
        ),
        Workload(
            "bigarray",
            "Large arrays",
            "224x224x3 uint8 images, one copy per sample, batch 64 (9.6 MB); GB/s of batches delivered to a "
            "consumer that touches nothing, against one thread's memcpy of the same bytes.",
            64,
            copy_transform,
            _bigarray_data,
            "GB/s",
            (224, 224, 3),
        ),
        Workload(
            "overhead",
            "Per-batch overhead",
            "float32 samples of shape (4,), identity transform, batch 32: the cost of the machinery itself.",
            32,
            identity,
            _overhead_data,
            "batches/s",
            (4,),
        ),
        Workload(
            "epochs",
            "Short epochs",
            f"Tiny samples with ~{LIGHT_WORK_S * 1e3:g} ms of CPU work each, batch 32, 2 workers: "
            f"{SHORT_EPOCH_BATCHES}-batch epochs against one {LONG_EPOCH_BATCHES}-batch epoch. "
            "A loader that drains its pipeline at each epoch end loses throughput here.",
            32,
            light_transform,
            lambda: epoch_data(LONG_EPOCH_BATCHES),
            "samples/s",
            (4,),
        ),
    )
}


@cache
def _data(name: str) -> tuple[np.ndarray, np.ndarray]:
    return WORKLOADS[name].make_data()


# --- the seed's generator ---------------------------------------------------------------------------------


def plain_generator(
    batch_size: int, data_x: Any, data_y: Any, transform: Callable[[Sample], Sample], shuffle: bool = True
) -> Generator[Batch, None, None]:
    """The seed's ``data_generator`` as written, with ``transform`` applied per sample and numpy stacking at
    the end, so that it delivers the same arrays as the other systems (the demo's copy of it)."""
    from prefetch.demo import plain_data_generator

    yield from plain_data_generator(batch_size, data_x, data_y, shuffle=shuffle, transform=transform)


def seed_index_batches(batch_size: int, n: int, shuffle: bool, rng: random.Random) -> Iterator[list[int]]:
    """The seed generator's order as index batches: shuffle, walk, reshuffle at each wrap; batches straddle."""
    index_list = [*range(n)]
    if shuffle:
        rng.shuffle(index_list)
    index = 0
    while True:
        batch = []
        for _ in range(batch_size):
            if index >= n:
                index = 0
                if shuffle:
                    rng.shuffle(index_list)
            batch.append(index_list[index])
            index += 1
        yield batch


# --- the roll-your-own baseline: multiprocess.Pool.imap ---------------------------------------------------

_POOL_STATE: dict[str, Any] = {}


def _pool_init(data_x: Any, data_y: Any, transform: Callable[[Sample], Sample]) -> None:
    """Pool initializer: the worker keeps the data (inherited for free under fork) and the transform."""
    _POOL_STATE.update(x=data_x, y=data_y, transform=transform)


def make_batch(indices: list[int]) -> Batch:
    """In a pool worker: load, transform and stack one batch (the arrays are pickled back to the consumer)."""
    x, y, transform = _POOL_STATE["x"], _POOL_STATE["y"], _POOL_STATE["transform"]
    xs, ys = [], []
    for i in indices:
        sx, sy = transform((x[i], y[i]))
        xs.append(sx)
        ys.append(sy)
    return np.stack(xs), np.asarray(ys)


def make_pool(workers: int, data_x: Any, data_y: Any, transform: Callable[[Sample], Sample]) -> Any:
    """A forked ``multiprocess.Pool`` whose workers hold the data and the transform."""
    import multiprocess

    return multiprocess.get_context("fork").Pool(workers, initializer=_pool_init, initargs=(data_x, data_y, transform))


def pool_imap_batches(
    pool: Any, batch_size: int, n: int, *, window: int, shuffle: bool = True, seed: int = 0
) -> Generator[Batch, None, None]:
    """Endless batches from ``pool.imap(make_batch, index_batches)``, in order, shuffled like the seed.

    ``Pool.imap`` reads its input as fast as it can, so an endless index stream would queue tasks (and
    results) without bound; a semaphore of ``window`` tasks ahead of the consumer bounds it, as any working
    roll-your-own version has to. Closing the generator stops the input and waits for the batches in flight,
    after which ``pool.close(); pool.join()`` is clean. (``pool.terminate()`` while a worker is writing a
    result can kill it holding the result queue's lock and hang the pool's task thread for ever.)
    """
    ahead = threading.Semaphore(window)
    stop = threading.Event()

    def index_batches() -> Iterator[list[int]]:
        for indices in seed_index_batches(batch_size, n, shuffle, random.Random(seed)):
            ahead.acquire()
            if stop.is_set():
                return
            yield indices

    results = pool.imap(make_batch, index_batches())
    try:
        for batch in results:
            ahead.release()
            yield batch
    finally:
        stop.set()
        ahead.release()  # wake the task thread if it waits for room: it sees ``stop`` and ends the input
        for _ in results:  # the batches already in flight
            pass


# --- the PyTorch baseline ---------------------------------------------------------------------------------


class ArrayDataset:
    """Map-style dataset over ``(x, y)`` with the workload's transform applied per sample."""

    def __init__(self, data_x: Any, data_y: Any, transform: Callable[[Sample], Sample]) -> None:
        self.x = data_x
        self.y = data_y
        self.transform = transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Sample:
        return self.transform((self.x[i], self.y[i]))


@cache
def torch_dataset_class() -> type:
    """``ArrayDataset`` as a ``torch.utils.data.Dataset`` subclass, made on demand so that importing this
    module never imports torch (prefetch's spawned workers would pay for it). Pickled by reference as
    ``workloads.TorchArrayDataset`` through the module ``__getattr__`` below."""
    from torch.utils.data import Dataset

    return type(
        "TorchArrayDataset",
        (ArrayDataset, Dataset),
        {"__module__": __name__, "__doc__": ArrayDataset.__doc__},
    )


def __getattr__(name: str) -> Any:
    if name == "TorchArrayDataset":
        return torch_dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def numpy_collate(samples: list[Sample]) -> Batch:
    """Collate into numpy arrays, as the other systems deliver."""
    xs, ys = zip(*samples, strict=True)
    return np.stack(xs), np.asarray(ys)


# Samples per "epoch" of torch's sampler in the throughput runs: longer than any run, so that torch's
# pipeline never drains at an epoch end there (test_epochs measures that cost on its own).
TORCH_LONG_EPOCH_SAMPLES = 10_000_000


def _endless(loader: Any) -> Generator[Any, None, None]:
    while True:
        yield from loader


# --- one stream per system --------------------------------------------------------------------------------


@dataclass
class Stream:
    """An endless iterator of batches, plus whatever the benchmark may want to read about its system."""

    batches: Iterator[Any]
    info: Callable[[], dict[str, Any]] = dict
    loader: Any = None  # the prefetch.Loader, for prefetch streams


@contextmanager
def plain_stream(
    data_x: Any, data_y: Any, transform: Callable[[Sample], Sample], batch_size: int, *, seed: int = 0
) -> Iterator[Stream]:
    """The seed's generator in this process (it shuffles with the global ``random``, seeded here)."""
    random.seed(seed)
    batches = plain_generator(batch_size, data_x, data_y, transform)
    try:
        yield Stream(batches)
    finally:
        batches.close()


@contextmanager
def memcpy_stream(data_x: np.ndarray, batch_size: int) -> Iterator[Stream]:
    """One ``np.copyto`` of a batch's bytes into a preallocated buffer per step, cycling over the data set
    (so the source is not cache-resident): what one thread can move, the ceiling for delivered GB/s."""
    n_batches = len(data_x) // batch_size
    out = np.empty((batch_size, *data_x.shape[1:]), data_x.dtype)

    def copies() -> Iterator[tuple[np.ndarray, None]]:
        k = 0
        while True:
            np.copyto(out, data_x[k * batch_size : (k + 1) * batch_size])
            k = (k + 1) % n_batches
            yield out, None

    yield Stream(copies())


@contextmanager
def pool_stream(
    data_x: Any, data_y: Any, transform: Callable[[Sample], Sample], batch_size: int, workers: int, *, seed: int = 0
) -> Iterator[Stream]:
    """``multiprocess.Pool(workers).imap`` over index batches, at most 2 per worker ahead."""
    pool = make_pool(workers, data_x, data_y, transform)
    batches = pool_imap_batches(pool, batch_size, len(data_x), window=2 * workers, seed=seed)
    try:
        yield Stream(batches)
    finally:
        batches.close()  # no more input, nothing in flight
        pool.close()
        pool.join()


@contextmanager
def torch_stream(
    data_x: Any,
    data_y: Any,
    transform: Callable[[Sample], Sample],
    batch_size: int,
    workers: int,
    *,
    collate: str = "numpy",
    long_epochs: bool = True,
    start_method: str | None = None,
    seed: int = 0,
) -> Iterator[Stream]:
    """PyTorch ``DataLoader`` (persistent workers, ``prefetch_factor=2``), iterated epoch after epoch.

    ``collate="numpy"`` stacks into numpy arrays like every other system; ``"tensor"`` is torch's default
    collate (tensors, in shared memory when made in a worker). ``long_epochs`` shuffles with a
    ``RandomSampler`` of one epoch longer than the run (the same as ``shuffle=True`` over the data repeated),
    so the measure is not cut by epoch ends; without it, ``shuffle=True`` over the data set as is.
    """
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    if workers < 1:
        raise ValueError("the torch baseline needs workers >= 1 (persistent_workers, prefetch_factor)")
    dataset = torch_dataset_class()(data_x, data_y, transform)
    generator = torch.Generator()
    generator.manual_seed(seed)
    order: dict[str, Any]
    if long_epochs:
        samples = math.ceil(TORCH_LONG_EPOCH_SAMPLES / len(dataset)) * len(dataset)
        order = {"sampler": RandomSampler(dataset, num_samples=samples, generator=generator)}
    else:
        order = {"shuffle": True, "generator": generator}
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=True,
        prefetch_factor=2,
        collate_fn=numpy_collate if collate == "numpy" else None,
        multiprocessing_context=start_method,
        **order,
    )
    batches = _endless(loader)
    try:
        yield Stream(batches)
    finally:
        batches.close()
        iterator, loader._iterator = loader._iterator, None
        if iterator is not None:
            iterator._shutdown_workers()


@contextmanager
def prefetch_stream(
    data_x: Any,
    data_y: Any,
    transform: Callable[[Sample], Sample],
    batch_size: int,
    workers: int,
    *,
    seed: int = 0,
    **options: Any,
) -> Iterator[Stream]:
    """``prefetch.Loader`` (endless, shuffled) over the workload; ``options`` go to the Loader."""
    import prefetch

    loader = prefetch.Loader(
        data_x, data_y, batch_size=batch_size, shuffle=True, seed=seed, workers=workers, transform=transform, **options
    )
    batches = loader.stream()  # endless: every epoch, one generator

    def info() -> dict[str, Any]:
        stats = loader.stats()
        return {
            "prefetch": loader.prefetch,
            "wait_fraction": round(stats.wait_fraction, 4),
            "mean_fill": round(stats.mean_fill, 2),
            "worker_busy": [round(b, 3) for b in stats.worker_busy.values()],
        }

    try:
        yield Stream(batches, info, loader)
    finally:
        batches.close()
        loader.close()


SYSTEMS = ("plain", "memcpy", "pool", "torch", "torch-tensor", "prefetch")


def open_stream(
    system: str,
    workload: Workload,
    workers: int | None,
    *,
    data: tuple[np.ndarray, np.ndarray] | None = None,
    long_epochs: bool = True,
    start_method: str | None = None,
) -> Any:
    """The context manager of ``system``'s stream over ``workload`` (``data`` replaces the workload's own)."""
    x, y = workload.data() if data is None else data
    transform, batch_size = workload.transform, workload.batch_size
    if system == "plain":
        return plain_stream(x, y, transform, batch_size)
    if system == "memcpy":
        return memcpy_stream(x, batch_size)
    assert workers is not None, f"{system} needs a worker count"
    if system == "pool":
        return pool_stream(x, y, transform, batch_size, workers)
    if system in ("torch", "torch-tensor"):
        collate = "numpy" if system == "torch" else "tensor"
        return torch_stream(
            x, y, transform, batch_size, workers, collate=collate, long_epochs=long_epochs, start_method=start_method
        )
    if system == "prefetch":
        return prefetch_stream(x, y, transform, batch_size, workers, start_method=start_method)
    raise ValueError(f"unknown system {system!r}; one of {SYSTEMS}")
