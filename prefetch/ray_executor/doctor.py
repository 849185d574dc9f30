"""``python -m prefetch doctor --ray``: can this process use a Ray cluster for ``executor="ray"``?

Each check is a ``doctor.Finding``: Ray importable, a cluster joined (or a local instance started),
its nodes, CPUs and object store, and a round trip through one actor that imports prefetch on
its node -- the same prefetch version must be installed wherever actors run -- and sends back an
8 MiB array through the object store. If the doctor started Ray itself, it shuts it down again.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..preflight import Finding

ROUND_TRIP_BYTES = 8 * 2**20
# Below this much object store in all, ``prefetch`` batches of images may not fit.
SMALL_STORE_BYTES = 2**30


def _installed() -> str:
    """The installed prefetch's version, as its package metadata says (what every node must match)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prefetch")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _package_dir() -> str:
    """Where this process imports prefetch from."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Probe:
    """The doctor's actor: says where it runs and which prefetch it imports, and echoes arrays."""

    def where(self) -> tuple[str, str, int]:
        return _installed(), _package_dir(), os.getpid()

    def echo(self, array: Any) -> Any:
        return array


def ray_findings(address: str | None = None) -> list[Finding]:
    """The Ray part of the doctor's report."""
    try:
        import ray
    except ImportError:
        return [Finding("error", "Ray is not installed", 'pip install "prefetch[ray]"')]
    findings = [Finding("ok", f"ray {ray.__version__} imported")]
    started_here = not ray.is_initialized()
    try:
        if started_here:
            ray.init(address=address)
    except Exception as error:
        where = address or os.environ.get("RAY_ADDRESS") or "a local instance"
        return [*findings, Finding("error", f"could not join or start Ray ({where}): {error}", "check `ray status`")]
    try:
        findings.append(_cluster(ray))
        findings.append(_round_trip(ray))
    except Exception as error:
        findings.append(Finding("error", f"the round trip through an actor failed: {error}", "check `ray status`"))
    finally:
        if started_here:
            ray.shutdown()
    return findings


def _cluster(ray: Any) -> Finding:
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    total = ray.cluster_resources()
    cpus, store = total.get("CPU", 0), total.get("object_store_memory", 0)
    addresses = sorted({node.get("NodeManagerAddress", "?") for node in nodes})
    what = (
        f"Ray cluster: {len(nodes)} node(s) at {', '.join(addresses)}, {cpus:g} CPUs, "
        f"{store / 2**30:.1f} GiB of object store"
    )
    if store < SMALL_STORE_BYTES:
        return Finding("warn", what, "a small object store holds few batches of images: raise object_store_memory")
    return Finding("ok", what)


def _round_trip(ray: Any) -> Finding:
    import numpy as np

    probe = ray.remote(_Probe).options(num_cpus=0).remote()
    try:
        version, path, pid = ray.get(probe.where.remote(), timeout=120)
        array = np.ones(ROUND_TRIP_BYTES, dtype=np.uint8)
        ray.get(probe.echo.remote(array))  # warm
        started = time.perf_counter()
        back = ray.get(probe.echo.remote(array))
        seconds = time.perf_counter() - started
    finally:
        ray.kill(probe)
    if version != _installed():
        return Finding(
            "error",
            f"the actor (pid {pid}) imports prefetch {version} from {path}, this process {_installed()}",
            "install the same prefetch version on every node",
        )
    assert back.nbytes == ROUND_TRIP_BYTES
    return Finding(
        "ok",
        f"round trip through an actor (pid {pid}, prefetch from {path}): "
        f"{ROUND_TRIP_BYTES / 2**20:.0f} MiB there and back in {seconds * 1e3:.1f} ms",
    )
