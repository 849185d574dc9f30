"""The Ray tests' fixtures: one small local Ray instance for the session, on loopback only.

Before Ray starts anywhere in this session: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps every
Ray process bound to 127.0.0.1, and ``PYTHONPATH`` puts this checkout's ``prefetch`` and the test
helpers first, so the actors (processes Ray starts, which inherit this environment) run the code
under test. Ray itself is imported only inside the fixtures: collecting this directory without
Ray installed (the default tox env deselects ``-m ray``) must not fail.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent.parent
_PATHS = [str(_ROOT), str(_HERE), str(_HERE.parent)]
os.environ["PYTHONPATH"] = os.pathsep.join(
    _PATHS + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
for _path in reversed(_PATHS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# Small, as the machine is shared: 4 CPUs of accounting (actors hold none by default), 256 MiB of store.
LOCAL_RAY = {"num_cpus": 4, "object_store_memory": 256 * 2**20, "include_dashboard": False}


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
            ray.init(**LOCAL_RAY)
            self._note_session()

    def two_nodes(self, cpus_per_node: int = 2):
        import ray
        from ray.cluster_utils import Cluster

        self.shutdown()
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
        instances.shutdown()
        instances.clean()


@pytest.fixture
def local_ray(ray_instances):
    """The session's local Ray instance (started on first use)."""
    pytest.importorskip("ray")
    ray_instances.local()
    return ray_instances


@pytest.fixture(autouse=True)
def no_leaks():
    """Replaces the suite's process check: Ray starts and pools worker processes of its own. Each
    Ray test checks that the loader's actors are gone instead (``assert_no_actors``)."""
    yield
