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
        got = list(loader.stream())
        stats = loader.stats()
    assert set(stats.worker_nodes.values()) == nodes  # two actors on each node
    made = {node: sum(stats.worker_busy[pid] for pid, at in stats.worker_nodes.items() if at == node) for node in nodes}
    assert all(busy > 0 for busy in made.values()), made  # both nodes made batches
    assert digests(got) == expected


def test_a_node_lost_mid_run_has_its_batches_redone_elsewhere(two_nodes):
    import ray

    options = {**OPTIONS, "transform": slow_augment}
    expected = digests(processes_stream(DATA_X, DATA_Y, **options))
    head = ray.get_runtime_context().get_node_id()
    second = next(node for node in two_nodes.worker_nodes)
    executor = prefetch.RayExecutor(actor_options={"scheduling_strategy": "SPREAD"})
    with prefetch.Loader(DATA_X, DATA_Y, workers=4, retries=2, executor=executor, **options) as loader:
        got = []
        for batch in loader.stream():
            got.append(batch)
            if len(got) == 8:
                assert len(set(loader.stats().worker_nodes.values())) == 2
                two_nodes.remove_node(second)  # its raylet, object store and actors go at once
        stats = loader.stats()
    assert stats.restarts >= 1
    assert set(stats.worker_nodes.values()) == {head}  # the replacements are on the node that is left
    assert digests(got) == expected


def slow_augment(sample):
    import time

    time.sleep(0.004)
    return augment(sample)
