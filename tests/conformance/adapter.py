"""Every name the conformance suite takes from inside prefetch (or Ray) rather than from its public API.

The suite talks to executors through ``prefetch.Loader``, ``loader.engine`` (``worker_pids()``,
``helper_pid()``, ``stats()``), ``state_dict`` and the errors of ``prefetch.__all__``. What the public
API does not show -- where the processes executor names its shared-memory segments, the class of
the loader's Ray actors, Ray's own table of live actors -- is read here, and only here: when the
package's internals move, this is the one file of the suite to change.
"""

from __future__ import annotations

import os
from typing import Any

from helpers import segment_descriptors_here, segments_mapped_here, segments_of  # noqa: F401 (the adapter's view)

from prefetch.ipc.segments import SHM_DIR

# The class of the Ray actor that makes a loader's batches (prefetch/ray_executor/actor.py).
RAY_ACTOR_CLASS = "BatchMaker"


def segments_here() -> set[str]:
    """The /dev/shm segments of the loaders whose consumer is this process."""
    return set(segments_of(os.getpid()))


def segment_exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))


def ray_actors_alive() -> set[str]:
    """The ids of the loader actors that Ray's actor table (the GCS) lists as alive."""
    import ray

    table: dict[Any, Any] = ray._private.state.actors()
    return {
        actor["ActorID"]
        for actor in table.values()
        if actor.get("ActorClassName", "").endswith(RAY_ACTOR_CLASS) and actor["State"] == "ALIVE"
    }
