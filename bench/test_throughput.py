"""Throughput of prefetch against the plain generator, multiprocess.Pool and PyTorch DataLoader.

Each case builds one system's stream once (workers persist), warms it up, then times a fixed number of
batches per round (see ``conftest.measure``). The consumer drops every batch untouched, so the figure is the
rate at which the system *delivers* batches: the most a training step that takes no time could consume.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from workloads import LATENCY_S, WORKLOADS, open_stream


def _case(workload: str, system: str, workers: int | None) -> Any:
    return pytest.param(system, workers, id=f"{workload}-{system}-{'inline' if workers is None else workers}")


def _run(measure: Callable[..., Any], workload: str, system: str, workers: int | None, **extra: Any) -> None:
    if system.startswith("torch"):
        pytest.importorskip("torch")
    spec = WORKLOADS[workload]
    with open_stream(system, spec, workers) as stream:
        measure(stream, spec, system, workers, extra=extra)


@pytest.mark.parametrize(
    ("system", "workers"),
    [
        _case("cpu", "plain", None),
        _case("cpu", "pool", 2),
        _case("cpu", "torch", 1),
        _case("cpu", "torch", 2),
        *[_case("cpu", "prefetch", w) for w in (0, 1, 2, 4)],
    ],
)
def test_cpu(measure: Callable[..., Any], system: str, workers: int | None) -> None:
    """CPU-bound preprocessing (~1 ms of numpy per sample): samples/s against workers.

    Why: the main reason to use worker processes. prefetch should scale near-linearly up to the usable
    cores (2 here), match the other multiprocess systems, and with 4 workers on 2 cores lose little to
    oversubscription. ``workers=0`` shows the cost of prefetch's in-process path over the plain generator.
    """
    _run(measure, "cpu", system, workers)


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # torch on more workers than cores
@pytest.mark.parametrize(
    ("system", "workers"),
    [
        _case("latency", "plain", None),
        *[_case("latency", s, w) for s in ("torch", "prefetch") for w in (1, 2, 4, 8, 16, 32)],
    ],
)
def test_latency(measure: Callable[..., Any], system: str, workers: int | None) -> None:
    """Latency-bound loading (2 ms of sleep per sample): samples/s and % of ideal (workers / 2 ms).

    Why: loading from disk or network waits rather than computes, so throughput should grow with workers
    far beyond the cores; what stops it is the per-batch cost of the machinery, which shows here as the
    gap to ideal at 16 and 32 workers. (``time.sleep(0.002)`` itself overshoots by tens of microseconds.)
    """
    ideal = (workers or 1) / LATENCY_S
    _run(measure, "latency", system, workers, ideal=ideal)


@pytest.mark.parametrize(
    ("system", "workers"),
    [
        _case("bigarray", "plain", None),
        _case("bigarray", "memcpy", None),
        _case("bigarray", "pool", 2),
        _case("bigarray", "torch", 2),
        _case("bigarray", "torch-tensor", 2),
        *[_case("bigarray", "prefetch", w) for w in (1, 2)],
    ],
)
def test_bigarray(measure: Callable[..., Any], system: str, workers: int | None) -> None:
    """Large arrays (64 x 224x224x3 uint8 per batch, a copy per sample): GB/s of batches delivered.

    Why: with big batches the cost is moving bytes between processes. Pickling through a pipe (Pool, torch
    with numpy arrays) copies each batch several times; prefetch writes it once into shared memory, so its
    delivered bandwidth should be a good fraction of one thread's memcpy. torch's tensor collate (its own
    shared-memory path) is shown for reference.
    """
    _run(measure, "bigarray", system, workers)


@pytest.mark.parametrize(
    ("system", "workers"),
    [
        _case("overhead", "plain", None),
        _case("overhead", "pool", 2),
        _case("overhead", "torch", 2),
        _case("overhead", "torch-tensor", 2),
        *[_case("overhead", "prefetch", w) for w in (0, 1, 2)],
    ],
)
def test_overhead(measure: Callable[..., Any], system: str, workers: int | None) -> None:
    """Per-batch overhead (tiny samples, identity transform): batches/s.

    Why: with no work to hide, the rate is one over the fixed cost per batch of messages, wake-ups, collation
    and hand-over. It bounds every other workload from above, and it should be far below torch DataLoader's
    at the same worker count. Default (tensor) collate is measured once for torch, as users run it.
    """
    _run(measure, "overhead", system, workers)
