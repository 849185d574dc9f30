"""Work spreads over both nodes of a simulated two-node cluster, and the stream stays the same.

``ray.cluster_utils.Cluster`` runs two raylets on this machine (both on 127.0.0.1); each node has
its own object store, so batches made on the second node really travel between stores. This
module replaces the session's local instance with the cluster and shuts the cluster down after.
"""

from __future__ import annotations

import numpy as np
import pytest
from rayhelpers import augment, digests, processes_stream

import prefetch

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

DATA_X = np.random.default_rng(1).random((300, 8)).astype(np.float32)
DATA_Y = np.arange(300)
OPTIONS = {"batch_size": 16, "epochs": 2, "seed": 99, "transform": augment}


@pytest.fixture
def two_nodes(ray_instances):
    pytest.importorskip("ray")
    cluster = ray_instances.two_nodes()
    try:
        yield cluster
    finally:
        ray_instances.shutdown()


def test_actors_on_both_nodes_make_the_same_stream(two_nodes):
    import ray

    expected = digests(processes_stream(DATA_X, DATA_Y, **OPTIONS))
    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(nodes) == 2
    executor = prefetch.RayExecutor(actor_options={"scheduling_strategy": "SPREAD", "num_cpus": 1})
    with prefetch.Loader(DATA_X, DATA_Y, workers=4, executor=executor, **OPTIONS) as loader:
        got = list(loader)
        stats = loader.stats()
    assert set(stats.worker_nodes.values()) == nodes  # two actors on each node
    made = {node: sum(stats.worker_busy[pid] for pid, at in stats.worker_nodes.items() if at == node) for node in nodes}
    assert all(busy > 0 for busy in made.values()), made  # both nodes made batches
    assert digests(got) == expected
