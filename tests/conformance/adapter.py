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

from prefetch.ipc.segments import NAME_ROOT, SHM_DIR

# The class of the Ray actor that makes a loader's batches (prefetch/ray_executor/actor.py).
RAY_ACTOR_CLASS = "BatchMaker"


def segments_here() -> set[str]:
    """The /dev/shm segments of the loaders whose consumer is this process."""
    mine = f"{NAME_ROOT}{os.getpid()}-"
    return {name for name in os.listdir(SHM_DIR) if name.startswith(mine)}


def segments_mapped_here() -> set[str]:
    """Lines of /proc/self/maps that map a prefetch segment (its file may be unlinked already)."""
    root = os.path.join(SHM_DIR, NAME_ROOT)
    with open("/proc/self/maps") as maps:
        return {line.split(None, 5)[-1].strip() for line in maps if root in line}


def segment_descriptors_here() -> set[str]:
    """This process's open descriptors to a prefetch segment, as 'fd -> path'."""
    root = os.path.join(SHM_DIR, NAME_ROOT)
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir itself used, now closed
            continue
        if target.startswith(root):
            found.add(f"{fd} -> {target}")
    return found


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
