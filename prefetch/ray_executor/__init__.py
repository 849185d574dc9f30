"""``executor="ray"``: the loader's workers are Ray actors, anywhere on a Ray cluster.

``RayExecutor`` is the template (the address, the actors' options, ``copy``); each ``start`` makes
one ``run.RayRun``, which runs the same ``core.schedule.Schedule`` the ``processes`` coordinator runs,
but in the consumer's process: it sends each batch's sample indices to the least-loaded actor
(``actor.BatchMaker``, which keeps the executor contract as a worker process does) and collects the
collated batches from the object store in completion order; the engine reorders them. So the stream
is the one ``processes`` yields, for any number of actors. How sources and batches travel is
``transfer``. Ray is imported when a loader starts, never by ``import prefetch``.
See ``docs/design.md`` ("The Ray executor").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..core.config import LoaderConfig
    from ..executor import Wake
    from .run import RayRun

# Spread the actors over the cluster's nodes unless the user says otherwise.
DEFAULT_ACTOR_OPTIONS: dict[str, Any] = {"scheduling_strategy": "SPREAD"}
# prefetch redoes a lost actor's batches itself: Ray must neither restart actors nor retry calls.
FORCED_ACTOR_OPTIONS: dict[str, Any] = {"max_restarts": 0, "max_task_retries": 0}


class RayExecutor:
    """Make the loader's batches in Ray actors: ``workers`` actors, each ``actor_options``.

    ``address`` is passed to ``ray.init`` when Ray is not initialised yet (None: join the cluster
    ``RAY_ADDRESS`` or ``ray start`` names, else start a local instance). ``actor_options`` go to
    the actor's ``.options()`` (``num_cpus``, ``resources``, a ``scheduling_strategy``...); the
    default spreads actors over the nodes, and takes Ray's default CPU accounting for actors (one
    CPU to be placed, none held while it runs), so more actors than CPUs fit -- what
    latency-bound loading wants. ``copy=False`` yields read-only arrays viewing the object store.

    A template: it holds only these options, so one executor serves any number of loaders and
    iterations; every ``start`` makes a run of its own.
    """

    def __init__(self, address: str | None = None, actor_options: dict[str, Any] | None = None, *, copy: bool = True):
        if actor_options is not None and not isinstance(actor_options, dict):
            raise TypeError(f"actor_options must be a dict of Ray actor options or None; got {actor_options!r}")
        self.address = address
        self.user_options = dict(actor_options or {})
        self.actor_options = {**DEFAULT_ACTOR_OPTIONS, **self.user_options, **FORCED_ACTOR_OPTIONS}
        self.copy = copy

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r}, actor_options={self.actor_options!r}, copy={self.copy})"

    def start(self, config: LoaderConfig, start: int, wake: Wake) -> RayRun:
        """Join (or start) Ray, start the actors and send them their first batches."""
        if config.cache == "memory":  # per node, nobody would remove the other nodes' entries
            raise ValueError(
                "cache='memory' keeps samples in this machine's shared memory, which Ray's actors on other nodes "
                "cannot reach; with executor='ray' pass cache=<a directory on each node's local disk>"
            )
        import ray

        from .run import RayRun

        if config.hedge:
            raise ValueError(
                "hedge=True is not supported by the Ray executor (a late batch is not made twice there); "
                "use hedge=False, or executor='processes'"
            )
        if not ray.is_initialized():
            ray.init(address=self.address)
        run = RayRun(self.actor_options, self.copy, config, start, wake)
        run.dispatch()
        return run
