"""``executor="ray"`` beside the processes executor, on one local Ray instance, in one run.

Run: ``BENCH_RESULTS_NAME=ray pytest bench/test_ray.py --benchmark-enable -p no:cacheprovider`` (needs Ray;
skipped without it). The tables go to ``bench/results/ray.md`` and ``ray.json``.

* ``latency`` (2 ms of sleep per sample, batch 32): actors 4, 8, 16, 32 against worker processes at the
  same counts; the ideal is ``actors / 2 ms``. Actors take Ray's default accounting (one CPU to be placed,
  none held while running), so 32 actors fit on this 2-CPU instance.
* ``cpu`` (~1 ms of numpy per sample): 2 actors against the plain generator.
* ``overhead`` (tiny samples, identity): batches/s, 1 and 2 actors against 1 and 2 processes: the
  per-batch cost of a call, its result's trip through the object store, and the consumer's bookkeeping.
* ``bigarray`` (64 x 224x224x3 uint8 per batch): GB/s and the consumer's cores, with the copy that makes
  yielded arrays writable (the default) and without it (``copy=False``: read-only views of the store).

Ray starts once for the module (``num_cpus=2``, 1 GiB of object store, no dashboard, 127.0.0.1 only)
and is shut down, and its session directory removed, at the end.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from workloads import LATENCY_S, WORKLOADS, open_stream, prefetch_stream

_ROOT = Path(__file__).resolve().parent.parent

LOCAL_RAY = {"num_cpus": 2, "object_store_memory": 2**30, "include_dashboard": False}


@pytest.fixture(scope="module", autouse=True)
def ray_instance() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    saved = {name: os.environ.get(name) for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "PYTHONPATH")}
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray starts: loopback only
    # Actors are processes Ray starts: they import prefetch and the workloads from this checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(_ROOT), str(_ROOT / "bench"), os.environ.get("PYTHONPATH", "")])
    ray.init(**LOCAL_RAY)
    session = ray._private.worker._global_node.get_session_dir_path()
    try:
        yield
    finally:
        ray.shutdown()
        for name, value in saved.items():  # the other benchmarks' processes get the environment they had
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(session, ignore_errors=True)
        latest = os.path.join(os.path.dirname(session), "session_latest")
        if os.path.islink(latest) and not os.path.exists(latest):
            os.unlink(latest)


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Replaces the suite's check: Ray pools processes of its own. ``RayExecutor.stop`` waits for the
    loader's actor processes to end, so a leftover actor would show as a slower next case, not here."""
    yield


def ray_stream(workload: str, actors: int, copy: bool = True) -> Any:
    """The workload's endless shuffled stream from ``actors`` Ray actors: ``prefetch.Loader(executor=...)``."""
    import prefetch

    spec = WORKLOADS[workload]
    x, y = spec.data()
    executor = prefetch.RayExecutor(copy=copy)
    return prefetch_stream(x, y, spec.transform, spec.batch_size, actors, executor=executor)


def _processes(measure: Callable[..., Any], workload: str, workers: int | None, system: str = "prefetch", **extra: Any):
    spec = WORKLOADS[workload]
    with open_stream(system, spec, workers, start_method="forkserver") as stream:  # Ray's threads: no fork
        measure(stream, spec, system, workers, extra=extra)


def _ray(measure: Callable[..., Any], workload: str, actors: int, copy: bool = True, **extra: Any) -> None:
    with ray_stream(workload, actors, copy) as stream:
        measure(stream, WORKLOADS[workload], "ray" if copy else "ray-view", actors, extra=extra)


@pytest.mark.parametrize("count", [4, 8, 16, 32])
@pytest.mark.parametrize("system", ["prefetch", "ray"])
def test_latency(measure: Callable[..., Any], system: str, count: int) -> None:
    """Latency-bound: samples/s and % of ideal (count / 2 ms), actors against worker processes."""
    ideal = count / LATENCY_S
    if system == "ray":
        _ray(measure, "latency", count, ideal=ideal)
    else:
        _processes(measure, "latency", count, ideal=ideal)


@pytest.mark.parametrize(("system", "count"), [("plain", None), ("prefetch", 2), ("ray", 2)])
def test_cpu(measure: Callable[..., Any], system: str, count: int | None) -> None:
    """CPU-bound: 2 actors against the plain generator and 2 worker processes (2 cores)."""
    if system == "ray":
        _ray(measure, "cpu", 2)
    else:
        _processes(measure, "cpu", count, system=system)


@pytest.mark.parametrize(("system", "count"), [("prefetch", 1), ("prefetch", 2), ("ray", 1), ("ray", 2)])
def test_overhead(measure: Callable[..., Any], system: str, count: int) -> None:
    """Per-batch overhead with tiny samples: batches/s, actors against worker processes."""
    if system == "ray":
        _ray(measure, "overhead", count)
    else:
        _processes(measure, "overhead", count)


@pytest.mark.parametrize(
    ("system", "count"), [("memcpy", None), ("prefetch", 2), ("ray", 2), ("ray-view", 2)]
)  # fmt: skip
def test_bigarray(measure: Callable[..., Any], system: str, count: int | None) -> None:
    """Large arrays: GB/s delivered and the consumer's cores; ``ray-view`` skips the copy out of the store."""
    if system in ("ray", "ray-view"):
        _ray(measure, "bigarray", 2, copy=system == "ray")
    else:
        _processes(measure, "bigarray", count, system=system)
