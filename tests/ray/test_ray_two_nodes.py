"""Work spreads over both nodes of a simulated two-node cluster, and the stream stays the same.

``ray.cluster_utils.Cluster`` runs two raylets on this machine (both on 127.0.0.1); each node has
its own object store, so batches made on the second node really travel between stores. This
module replaces the session's local instance with the cluster and shuts the cluster down after.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from rayhelpers import Opener, augment, digests, gated, processes_stream

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


def _gated(tmp_path: Any, transform: Any, count: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Options for the processes reference (its gate open) and for the actors (``gated``: shut until the
    test opens it, then with ``count`` each actor's second batch waits until ``count`` actors made one)."""
    reference, shut = tmp_path / "reference", tmp_path / "actors"
    reference.mkdir(), shut.mkdir()
    for name in ["open", *(f"made-{i}" for i in range(count))]:
        (reference / name).touch()
    size = OPTIONS["batch_size"]
    return (
        {**OPTIONS, "transform": gated(transform, str(reference), size, count)},
        {**OPTIONS, "transform": gated(transform, str(shut), size, count)},
    )


def _all_started(loader: Any, workers: int) -> Any:
    """Whether all ``workers`` actors have said hello (read from the opener's thread while the consumer
    waits, held, for its first batch)."""
    return lambda: len(loader.stats().worker_nodes) >= workers


def test_actors_on_both_nodes_make_the_same_stream(two_nodes, tmp_path):
    import ray

    # An actor gets batches only once it has started, so the first one up could make the whole stream.
    # The gate makes it certain that both make batches: no batch is made until both actors have started
    # (the first one up holds the whole window meanwhile), and the first one's second batch waits until
    # the other has made one (it gets a place as soon as the consumer takes the first batch).
    reference, options = _gated(tmp_path, augment, count=2)
    expected = digests(processes_stream(DATA_X, DATA_Y, **reference))
    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(nodes) == 2
    executor = prefetch.RayExecutor(actor_options={"scheduling_strategy": "SPREAD", "num_cpus": 1})
    with prefetch.Loader(DATA_X, DATA_Y, workers=2, executor=executor, **options) as loader:
        opener = Opener(_all_started(loader, 2), str(tmp_path / "actors"), timeout_s=120)
        got = list(loader.stream())
        stats = loader.stats()
    opener.join()
    assert opener.reached
    assert set(stats.worker_nodes.values()) == nodes  # an actor on each node
    made = {node: sum(stats.worker_busy[pid] for pid, at in stats.worker_nodes.items() if at == node) for node in nodes}
    assert all(busy > 0 for busy in made.values()), made  # both nodes made batches
    assert digests(got) == expected


@pytest.mark.xfail(
    strict=False,
    raises=prefetch.WorkerDiedError,
    reason="open bug, seen once in about 9 runs since hello first: a batch redone after the node is lost was "
    "charged with 3 actor deaths (retries=2) and given up; any other failure still fails this test",
)
def test_a_node_lost_mid_run_has_its_batches_redone_elsewhere(two_nodes, tmp_path):
    import ray

    reference, options = _gated(tmp_path, slow_augment, count=0)  # no batch before all four actors started
    expected = digests(processes_stream(DATA_X, DATA_Y, **reference))
    head = ray.get_runtime_context().get_node_id()
    second = next(node for node in two_nodes.worker_nodes)
    executor = prefetch.RayExecutor(actor_options={"scheduling_strategy": "SPREAD"})
    with prefetch.Loader(DATA_X, DATA_Y, workers=4, retries=2, executor=executor, **options) as loader:
        opener = Opener(_all_started(loader, 4), str(tmp_path / "actors"), timeout_s=120)
        got = []
        for batch in loader.stream():
            got.append(batch)
            if len(got) == 8:
                assert opener.reached and len(set(loader.stats().worker_nodes.values())) == 2
                two_nodes.remove_node(second)  # its raylet, object store and actors go at once
        stats = loader.stats()
    opener.join()
    assert stats.restarts >= 1
    assert set(stats.worker_nodes.values()) == {head}  # the replacements are on the node that is left
    assert digests(got) == expected


def slow_augment(sample):
    import time

    time.sleep(0.004)
    return augment(sample)
