"""The Ray instance of a test session, for every test that runs on Ray: ``tests/ray`` and the Ray rows
of ``tests/conformance``. ``tests/conftest.py`` imports its fixtures, so both tiers share one instance.

Ray is imported only inside the fixtures: collecting the suite without Ray installed (the default run
deselects ``-m ray``) must not fail. Before Ray starts, ``prepare_environment`` binds every Ray process
to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) and puts this checkout's ``prefetch`` and the
test modules on ``PYTHONPATH``, so that the actors (processes Ray starts, which inherit this
environment) run the code under test and can import the tests' sources and transforms.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
_ROOT = _TESTS.parent
# Where the actors import from: the checkout, then the test modules the Ray tests pickle by reference.
RAY_PATHS = [str(_ROOT), str(_TESTS / "ray"), str(_TESTS), str(_TESTS / "conformance")]

# Small, as the machine is shared: 4 CPUs of accounting (actors hold none by default), 256 MiB of store.
LOCAL_RAY = {"num_cpus": 4, "object_store_memory": 256 * 2**20, "include_dashboard": False}


def prepare_environment() -> None:
    """Loopback only, and ``RAY_PATHS`` first on this process's ``sys.path`` and on the ``PYTHONPATH``
    every Ray process started from now on inherits (idempotent)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in RAY_PATHS]
    os.environ["PYTHONPATH"] = os.pathsep.join(RAY_PATHS + rest)
    for path in reversed(RAY_PATHS):
        if path not in sys.path:
            sys.path.insert(0, path)


class RayInstances:
    """Starts the session's local instance on demand; the two-node test swaps in a cluster."""

    def __init__(self) -> None:
        self.session_dirs: list[str] = []
        self.cluster = None

    def _note_session(self) -> None:
        import ray

        node = ray._private.worker._global_node
        if node is not None:
            self.session_dirs.append(node.get_session_dir_path())

    def local(self) -> None:
        import ray

        if self.cluster is not None:
            self.shutdown()
        if not ray.is_initialized():
            prepare_environment()
            ray.init(**LOCAL_RAY)
            self._note_session()

    def two_nodes(self, cpus_per_node: int = 2):
        import ray
        from ray.cluster_utils import Cluster

        self.shutdown()
        prepare_environment()
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": cpus_per_node, "object_store_memory": 128 * 2**20, "include_dashboard": False},
        )
        self.cluster.add_node(num_cpus=cpus_per_node, object_store_memory=128 * 2**20)
        ray.init(address=self.cluster.address)
        self._note_session()
        return self.cluster

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None

    def clean(self) -> None:
        """Remove the session directories this test session made under /tmp/ray, nobody else's."""
        for path in self.session_dirs:
            latest = os.path.join(os.path.dirname(path), "session_latest")
            if os.path.islink(latest) and os.path.realpath(latest) == os.path.realpath(path):
                os.unlink(latest)
            shutil.rmtree(path, ignore_errors=True)
        latest = "/tmp/ray/session_latest"
        if os.path.islink(latest) and not os.path.exists(latest):  # it pointed at a session removed here
            os.unlink(latest)


@pytest.fixture(scope="session")
def ray_instances():
    instances = RayInstances()
    try:
        yield instances
    finally:
        if "ray" in sys.modules:  # nothing to stop (or import) in a session that never started Ray
            instances.shutdown()
            instances.clean()


@pytest.fixture
def local_ray(ray_instances):
    """The session's local Ray instance (started on first use)."""
    pytest.importorskip("ray", reason='executor="ray" needs Ray: pip install "prefetch[ray]" (tox -e ray)')
    ray_instances.local()
    return ray_instances
