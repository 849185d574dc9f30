"""More than one machine: the loader's workers as Ray actors, with the same stream as worker processes.

Runs here on a small local Ray instance (2 CPUs, 127.0.0.1 only). On a real cluster, replace the
``ray.init(...)`` below with ``ray.init(address="auto")`` (or start nothing: prefetch joins the cluster
that ``RAY_ADDRESS`` or ``ray start`` names) and raise ``workers``.

Run: pip install "prefetch[ray]"; python examples/ray_cluster.py
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

import prefetch

N, BATCH, EPOCHS = 2048, 64, 2


def augment(sample):
    """A little waiting (a read from remote storage) and a random flip: randomness is per batch."""
    x, y = sample
    time.sleep(0.001)
    return (x[::-1] if prefetch.batch_rng().random() < 0.5 else x) + np.float32(np.random.rand()), y


def digest(batches) -> str:
    h = hashlib.sha256()
    for x, y in batches:
        h.update(x.tobytes())
        h.update(y.tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    x = np.random.default_rng(0).random((N, 16)).astype(np.float32)  # put in the object store once
    y = np.arange(N)
    options = {"batch_size": BATCH, "epochs": EPOCHS, "seed": 7, "transform": augment}
    with prefetch.Loader(x, y, workers=2, **options) as loader:  # worker processes, for comparison
        on_processes = digest(loader)

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local instance on loopback only
    ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        executor = prefetch.RayExecutor(actor_options={"num_cpus": 0.25})  # 8 actors on 2 CPUs: they mostly wait
        started = time.perf_counter()
        with prefetch.Loader(x, y, workers=8, executor=executor, **options) as loader:
            on_ray = digest(loader)
            stats = loader.stats()
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    # An actor gets batches once it has started: on a busy machine the first ones up may make them all.
    makers = [pid for pid, busy in stats.worker_busy.items() if busy > 0]
    nodes = len({stats.worker_nodes[pid] for pid in makers})
    print(f"ray: {stats.batches} batches in {seconds:.1f} s, made by {len(makers)} of 8 actors on {nodes} node(s)")
    print(f"ray stream == processes stream: {'OK' if on_ray == on_processes else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
