"""One start-to-stop of a ``RayExecutor``, in the consumer's process: ``RayRun``.

It holds the actors, the ``Schedule`` and the calls in flight: it dispatches batches to the
least-loaded actor, collects answers in completion order, replaces lost actors and redoes their
batches, and kills everything at the end. What it keeps (``docs/design.md``, "The Ray executor"):

* **Bound.** A ``Schedule`` place is an in-flight token here: a batch holds one from dispatch until
  the engine opens or drops it (``Leases.give_back``), at most ``prefetch`` of them.
* **Hello first.** An actor gets no batch before its ``hello`` has answered. So an actor that dies
  before that has run no batch: it could not start (a ``PrefetchError``); and every later death is a
  batch's, by an actor whose pid is known. (A batch queued behind the hello could kill the actor before
  the hello's answer left it, and a poison batch would then pass for an actor that could not start.)
  The first actors up take the whole window; the others get batches as places free up.
* **Lost actors.** Ray runs an actor's calls in submission order, so when an actor dies the calls it
  had not answered are, in order, the batch it was making and those queued behind it: they go to
  ``Schedule.lost``, are redone on a replacement actor, and the one it was making is given up after
  ``retries`` deaths (a ``GiveUp``). But an answer can die with its actor: a call that ended just
  before the kill fails as the one it was making does. So a death with several calls unanswered is not
  sure to be the front's: it counts against it without giving it up, and the front is redone alone on
  an actor (``Schedule.suspect``) until a death of its own decides.
* **Timeout.** ``late(b)`` kills the actor that has ``b``; its loss then gives ``b`` up as late and
  redoes the others.
* **Stop.** Every actor is killed and every reference dropped; ``stop`` waits for the actor processes
  on this node to end.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from ..core.reorder import Leases
from ..core.schedule import GiveUp, Schedule, Why
from ..errors import Failure, PrefetchError
from ..executor import Made, Result, Unmade, WorkerInfo
from .actor import BatchMaker
from .transfer import actor_config, pack_sources, writable

if TYPE_CHECKING:
    from ..core.config import LoaderConfig
    from ..core.order import Order
    from ..executor import Wake

# ``wait`` looks at the wake pipe (``close()`` from another thread) at least this often.
WAIT_SLICE_S = 0.05
# How long actors may take to be placed and to start before the loader gives up on them.
ACTOR_START_S = 120.0
# How long ``stop`` waits for the actor processes on this node to end after ``ray.kill``.
STOP_WAIT_S = 5.0


class Fetched(NamedTuple):
    """A made batch as the run keeps it (``Made.payload``): the schedule's place it holds, and the value
    Ray returned (read-only arrays viewing the object store, tensors as ``transfer.TensorArray``)."""

    place: int
    value: Any


@dataclass
class _Task:
    batch: int
    place: int
    ref: Any  # the ObjectRef of ``BatchMaker.make``
    alone: bool = False  # a suspect: nothing is queued behind it (see the module docstring)


@dataclass
class _Actor:
    """One actor of the loader and the calls it has not answered, in submission order."""

    handle: Any
    hello: Any  # the ObjectRef of ``hello()`` until it answers, then None
    born: float
    queue: deque[_Task] = field(default_factory=deque)
    pid: int | None = None
    node: str | None = None
    address: str | None = None
    dying: bool = False  # killed for ``timeout``: no new batch goes to it
    death: Any = None  # the Ray error that said it is gone


class RayRun:
    """One start-to-stop of a ``RayExecutor``: the actors, the schedule, the calls in flight."""

    def __init__(self, actor_options: dict[str, Any], copy: bool, config: LoaderConfig, start: int, wake: Wake):
        import ray

        self.ray = ray
        self.actor_options = actor_options
        self.copy = copy  # writable copies of the arrays Ray returns (``transfer.writable``)
        self.restarts = 0  # actors lost and replaced
        self.config = config
        self.wake = wake
        self.forgotten = False  # in a forked child: the actors are the parent's
        self.order: Order = config.order
        self.schedule = Schedule(self.order, start, config.prefetch, config.max_slots, config.retries)
        self.leases = Leases()  # places given back (batches are copied out: none is leased)
        self.answers: list[Result] = []  # results decided without an actor (a late batch nobody had)
        self.local_node = ray.get_runtime_context().get_node_id()
        sources, self.array_refs = pack_sources(config.sources, ray.put)
        self.config_ref: Any = ray.put(actor_config(config, sources))
        self.actor_class = ray.remote(BatchMaker).options(**actor_options)
        self.actors: list[_Actor] = [self._spawn() for _ in range(max(1, config.workers))]
        self.all_started = False

    def _spawn(self) -> _Actor:
        handle: Any = self.actor_class.remote(self.config_ref, *self.array_refs)  # Ray types it loosely
        return _Actor(handle, handle.hello.remote(), time.monotonic())

    # --- dispatch -----------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self.all_started

    def dispatch(self) -> None:
        """Send every batch the schedule allows to the least-loaded actor."""
        self.schedule.consumed(self.schedule.position, self._given_back(), 0)
        while True:
            batch = self.schedule.peek()
            if batch is None:
                return
            alone = self.schedule.suspect(batch)
            candidates = [actor for actor in self.actors if self._has_room(actor, alone)]
            task = self.schedule.next_task() if candidates else None
            if task is None:
                return
            batch, place = task
            actor = min(candidates, key=lambda a: len(a.queue))
            indices = self.order.batch_indices(batch).tobytes()  # bytes: the cheapest argument for Ray to pack
            actor.queue.append(_Task(batch, place, actor.handle.make.remote(batch, indices), alone))

    def _has_room(self, actor: _Actor, alone: bool) -> bool:
        """Whether ``actor`` may take a batch (``alone``: a suspect): it has said hello and is not being
        killed; nothing goes behind a suspect, and a suspect only to an idle actor."""
        return actor.pid is not None and not actor.dying and not (actor.queue and (alone or actor.queue[0].alone))

    def _given_back(self) -> list[int]:
        return [place for place, _ in self.leases.given_back()]

    def advance(self, position: int) -> None:
        self.schedule.consumed(position, self._given_back(), 0)
        self.dispatch()

    def open(self, made: Made) -> Any:
        fetched: Fetched = made.payload
        self.leases.give_back(fetched.place)
        return writable(fetched.value, self.copy)

    def drop(self, made: Made) -> None:
        self.leases.give_back(made.payload.place)

    def workers(self) -> list[WorkerInfo]:
        here = self.local_node
        return [WorkerInfo(a.pid, a.node, a.node == here) for a in self.actors if a.pid is not None]

    def helper_pid(self) -> int | None:
        return None  # no process besides the actors: the schedule runs in the consumer

    def forget(self) -> None:
        """In a child forked from the owner: touch no actor (they are the parent's; Ray's connection is
        not usable in a forked child anyway)."""
        self.forgotten = True

    # --- collecting ---------------------------------------------------------------------

    def _watched(self) -> list[Any]:
        refs = [actor.hello for actor in self.actors if actor.hello is not None]
        refs.extend(task.ref for actor in self.actors for task in actor.queue)
        return refs

    def wait(self, seconds: float) -> list[Result]:
        """Results in completion order, waiting up to ``seconds`` for the first; [] when woken.

        One non-blocking ``ray.wait`` first (with calls queued, something is often ready), then a
        blocking one in slices of ``WAIT_SLICE_S``, so a wake is seen promptly."""
        deadline = time.monotonic() + seconds
        while True:
            self.dispatch()
            results, self.answers = self.answers, []
            refs = self._watched()
            if refs:
                ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
                if not ready and not results:
                    left = max(0.0, min(WAIT_SLICE_S, deadline - time.monotonic()))
                    ready, _ = self.ray.wait(refs, num_returns=1, timeout=left)
                if ready:
                    results.extend(self._collect(set(ready)))
            elif not results:
                time.sleep(max(0.0, min(WAIT_SLICE_S, deadline - time.monotonic())))
            self._check_start()
            if results or self.wake.woken or time.monotonic() >= deadline:
                self.dispatch()
                return results

    def _collect(self, done: set[Any]) -> list[Result]:
        """The answers among ``done``: actors that said hello, batches made, actors lost. An actor answers
        in order, so only the front of its queue can be ready -- unless it died: then all are."""
        results: list[Result] = []
        values = self._fetch(done)
        for actor in list(self.actors):
            if actor.hello is not None and actor.hello in done:
                self._hello(actor)
            while actor.queue and actor.queue[0].ref in done:
                result = self._answer(actor, values)
                if result is _LOST:
                    results.extend(self._lose(actor))
                    break
                results.append(result)
        return results

    def _fetch(self, done: set[Any]) -> dict[Any, Any]:
        """The values of the ready batch calls, in one ``ray.get`` (cheaper than one each); {} when one of
        them is an error: ``_answer`` then gets them one by one and sees which."""
        refs = [task.ref for actor in self.actors for task in actor.queue if task.ref in done]
        if len(refs) < 2:
            return {}
        try:
            return dict(zip(refs, self.ray.get(refs)))
        except self.ray.exceptions.RayError:
            return {}

    def _hello(self, actor: _Actor) -> None:
        """``actor`` said hello: it may take batches from now on (the next ``dispatch``). It had none, so a
        failed hello is a start-up error, not a batch's (see the module docstring)."""
        try:
            actor.pid, actor.node, actor.address = self.ray.get(actor.hello)
        except self.ray.exceptions.RayError as error:
            raise PrefetchError(f"a Ray actor of the loader could not start: {_first_line(error)}") from error
        actor.hello = None

    def _answer(self, actor: _Actor, values: dict[Any, Any]) -> Any:
        """The front call of ``actor`` has answered: a ``Made``, an ``Unmade``, or ``_LOST``."""
        task = actor.queue[0]
        try:
            value = values.pop(task.ref) if task.ref in values else self.ray.get(task.ref)
        except self.ray.exceptions.RayTaskError as error:  # not user code (that is a ``Failure``): a bug of ours
            actor.queue.popleft()
            self.leases.give_back(task.place)
            return Unmade(task.batch, error)
        except self.ray.exceptions.RayError as error:  # the actor, or its node, is gone
            actor.death = error
            return _LOST
        actor.queue.popleft()
        if isinstance(value, Failure):
            self.leases.give_back(task.place)
            indices = tuple(self.order.batch_indices(task.batch).tolist())
            return Unmade(task.batch, value.to_exception(task.batch, indices, actor.pid))
        batch, timings = value
        return Made(task.batch, timings, actor.pid or 0, Fetched(task.place, batch))

    def _lose(self, actor: _Actor) -> list[Result]:
        """``actor`` died: replace it, redo its unanswered batches, fail the one it killed too often. It had
        batches, so it had said hello: its pid names it."""
        error = actor.death
        sure = len(actor.queue) == 1  # one call unanswered: the one it was making
        _kill(self.ray, actor.handle)
        self.actors[self.actors.index(actor)] = self._spawn()
        self.restarts += 1
        position = self.schedule.position
        tasks = [(t.batch, t.place) for t in actor.queue if t.batch >= position]
        for done in (t for t in actor.queue if t.batch < position):
            self.leases.give_back(done.place)
        late = [task for task in tasks if task[0] in self.schedule.late]
        if late:  # the batch it was killed for is the one it answers for, wherever it was queued
            tasks.remove(late[0])
            tasks.insert(0, late[0])
        actor.queue.clear()
        give_up = self.schedule.lost(tasks, sure)
        if give_up is None:
            return []
        who = f"Ray actor pid {actor.pid} on node {actor.address} ({(actor.node or '?')[:12]})"
        return [self._unmade(give_up._replace(pid=actor.pid, who=who, how=f"died ({_first_line(error)})"))]

    def _unmade(self, give_up: GiveUp) -> Unmade:
        indices = self.order.batch_indices(give_up.batch).tolist()
        return Unmade(give_up.batch, give_up.error(indices, self.config.timeout, self.config.retries))

    def _check_start(self) -> None:
        """Note when every actor has started; give up on actors Ray cannot place or start."""
        waiting = [actor for actor in self.actors if actor.pid is None and not actor.dying]
        if not waiting:
            self.all_started = True
            return
        oldest = min(actor.born for actor in waiting)
        if time.monotonic() - oldest > ACTOR_START_S:
            raise PrefetchError(
                f"{len(waiting)} Ray actor(s) of the loader did not start within {ACTOR_START_S:.0f}s: the cluster "
                f"may lack the resources they ask for (actor_options={self.actor_options}); `ray status` "
                "shows what is free"
            )

    # --- timeout and stop ---------------------------------------------------------------

    def late(self, batch: int) -> None:
        """``timeout`` passed for ``batch``: kill the actor that has it; nobody has it (not dispatched yet:
        no started actor had room, e.g. while a replacement starts): fail it now, as the coordinator does."""
        for actor in self.actors:
            for task in actor.queue:
                if task.batch == batch:
                    if _ready(self.ray, task.ref):
                        return  # made meanwhile: the engine gets it with the next ``wait``
                    self.schedule.mark_late(batch)
                    actor.dying = True
                    _kill(self.ray, actor.handle)  # its calls now fail: ``_lose`` reports the batch
                    return
        self.schedule.cancel(batch)
        self.answers.append(self._unmade(GiveUp(batch, Why.LATE)))

    def stop(self) -> None:
        """Kill every actor, drop every reference; wait for this node's actor processes to end."""
        import psutil

        if self.forgotten:
            return
        local = []
        for actor in self.actors:
            _kill(self.ray, actor.handle)
            if actor.pid is not None and actor.node == self.local_node:
                try:
                    local.append(psutil.Process(actor.pid))
                except psutil.Error:
                    pass
        self.actors = []
        self.array_refs = []
        self.config_ref = None
        self.answers = []
        psutil.wait_procs(local, timeout=STOP_WAIT_S)


_LOST = object()  # what ``_answer`` returns for a call whose actor is gone


def _ready(ray: Any, ref: Any) -> bool:
    ready, _ = ray.wait([ref], num_returns=1, timeout=0)
    return bool(ready)


def _kill(ray: Any, handle: Any) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # Ray shut down already, or the actor is gone: either way it is not running
        pass


def _first_line(error: Any) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
