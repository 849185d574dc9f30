"""``executor="ray"``: the loader's workers are Ray actors, anywhere on a Ray cluster.

The order stays with the loader. This executor runs the same ``core.schedule.Schedule`` the
``processes`` coordinator runs, but in the consumer's process: it asks it what to make next,
sends each batch's sample indices to the least-loaded actor (``BatchMaker.make``), and collects
the collated batches from the object store in completion order; the engine reorders them. An
actor makes a batch with ``core.pipeline.make_batch`` after seeding the global generators for
that batch number, exactly as a worker process does, so the stream is the one ``processes``
yields, for any number of actors.

* **Bound.** A ``Schedule`` slot is an in-flight token here: a batch holds one from dispatch
  until the engine opens or drops it, and there are at most ``prefetch`` of them (the user
  holds no store memory: batches are copied out, see below).
* **Lost actors.** Ray runs an actor's calls in submission order, so when an actor dies (its
  process killed, its node gone) the calls it had not answered are, in order, the batch it was
  making and those queued behind it: they go to ``Schedule.lost``, are redone on a replacement
  actor, and the one it was making is given up after ``retries`` deaths (``WorkerDiedError``).
* **Timeout.** ``late(b)`` kills the actor that has ``b``; its loss then reports ``b`` as
  ``WorkerTimeoutError`` and redoes the others.
* **Read-only arrays.** Arrays Ray returns view the object store and are read-only. The
  contract says yielded arrays are writable, so ``open`` copies every read-only array of a
  batch (tuples, lists and dicts are walked); ``RayExecutor(copy=False)`` skips the copy and
  yields the read-only views (a documented difference: writing to them raises). The cost is
  measured in ``bench/test_ray.py``.
* **Tensors.** The actor sends each plain ``torch.Tensor`` of a batch as its numpy array
  (``portable``: out of band, like any array, where torch's own pickling would copy its bytes
  in band); ``open`` makes it a tensor again over the writable copy (or, with ``copy=False``,
  over the read-only view: a tensor cannot be read-only, so that one must not be written).
* **Stop.** Every actor is killed (``ray.kill``) and every object reference the executor holds
  (sources, configuration, results in flight) is dropped, so nothing of the loader stays pinned;
  ``stop`` waits for the actor processes on this node to end.

Ray is imported when a loader starts, never by ``import prefetch``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import PrefetchError
from ..executor import Made, Result, WorkerInfo
from .transfer import writable

if TYPE_CHECKING:
    from ..core.config import LoaderConfig
    from ..ipc.channel import WakePipe
    from .run import Run

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
    """

    def __init__(self, address: str | None = None, actor_options: dict[str, Any] | None = None, *, copy: bool = True):
        if actor_options is not None and not isinstance(actor_options, dict):
            raise TypeError(f"actor_options must be a dict of Ray actor options or None; got {actor_options!r}")
        self.address = address
        self.user_options = dict(actor_options or {})
        self.actor_options = {**DEFAULT_ACTOR_OPTIONS, **self.user_options, **FORCED_ACTOR_OPTIONS}
        self.copy = copy
        self._restarts = 0  # actors lost and replaced in runs that have ended
        self._run: Run | None = None

    def __copy__(self) -> RayExecutor:
        """A fresh executor with the same options (``Loader`` copies the one it was given for each
        iteration): never a share of a running one's actors."""
        return RayExecutor(self.address, self.user_options, copy=self.copy)

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r}, actor_options={self.actor_options!r}, copy={self.copy})"

    # --- the Executor protocol ------------------------------------------------------------

    @property
    def restarts(self) -> int:
        """Actors lost and replaced, over this executor's life."""
        return self._restarts + (self._run.restarts if self._run is not None else 0)

    @property
    def started(self) -> bool:
        return self._run is not None and self._run.all_started

    def start(self, config: LoaderConfig, start: int, wake: WakePipe) -> None:
        import ray

        if self._run is not None:
            self.stop()
        from .run import Run

        if not ray.is_initialized():
            ray.init(address=self.address)
        self._run = Run(self.actor_options, config, start, wake)
        self._run.dispatch()

    def advance(self, position: int) -> None:
        self._need_run().advance(position)

    def wait(self, seconds: float) -> list[Result]:
        return self._need_run().wait(seconds)

    def late(self, batch: int) -> None:
        self._need_run().late(batch)

    def open(self, made: Made) -> Any:
        slot, value = made.where
        if self._run is not None:
            self._run.release(slot)
        return writable(value, self.copy)

    def drop(self, made: Made) -> None:
        if self._run is not None:
            self._run.release(made.where[0])

    def workers(self) -> list[WorkerInfo]:
        if self._run is None:
            return []
        here = self._run.local_node
        return [WorkerInfo(a.pid, a.node, a.node == here) for a in self._run.actors if a.pid is not None]

    def helper_pid(self) -> int | None:
        return None  # no process besides the actors: the schedule runs in the consumer

    def stop(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            self._restarts += run.restarts
            run.stop()

    def forget(self) -> None:
        """In a child forked from the owner: drop this copy's state and touch no actor (they are the
        parent's; Ray's connection is not usable in a forked child anyway)."""
        self._run = None

    def _need_run(self) -> Run:
        if self._run is None:
            raise PrefetchError("the Ray executor is not started (or was stopped)")
        return self._run
