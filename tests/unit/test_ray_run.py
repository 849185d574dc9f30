"""``ray_executor.run.RayRun`` against a scripted stand-in for Ray (no Ray needed): the order in which it
gives actors work, and how it words a death, where real Ray's timing would make a test flaky.

The stand-in keeps Ray's rules that the run relies on, and takes the worst timing each allows: an actor runs
its calls in submission order; an answer reaches the caller only at the caller's next ``wait``; and when the
actor's process dies, every answer not yet delivered dies with it (Ray sends a call's reply after the call
ends, so a kill right after can lose it), its hello's included.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

import numpy as np
import pytest

import prefetch
from prefetch.executor import Made, Unmade
from prefetch.validation import make_config

POISON_BATCH = 3  # every actor that makes it dies


class RayError(Exception):
    """Ray's base error (``ray.exceptions.RayError``)."""


class ActorDied(RayError):
    """Ray's ``ActorDiedError``: the call's actor is gone."""


class RayTaskError(RayError):
    """Ray's ``RayTaskError`` (never raised here: user errors come back as a ``Failure``)."""


class Ref:
    def __init__(self, value: Any = None, delivered: bool = False):
        self.value, self.error, self.delivered = value, None, delivered


class FakeActor:
    def __init__(self, ray: FakeRay, pid: int):
        self.ray, self.pid, self.alive = ray, pid, True
        self.undelivered: list[Ref] = []
        self.batches: list[int] = []  # the batches it was asked to make, in order
        self.hello_ref: Ref | None = None
        self.early: list[int] = []  # batches it was asked to make before its hello's answer was delivered
        self.hello = _Method(self._hello)
        self.make = _Method(self._make)

    def _call(self, value: Any) -> Ref:
        ref = Ref(value)
        self.undelivered.append(ref)
        if not self.alive:
            self.die()
        return ref

    def _hello(self) -> Ref:
        ref = self.hello_ref = self._call((self.pid, "node-1", "127.0.0.1"))
        if self.ray.broken:  # its constructor failed: the actor is gone before any call runs
            self.die()
        return ref

    def _make(self, batch: int, packed: bytes) -> Ref:
        self.batches.append(batch)
        if self.hello_ref is None or not self.hello_ref.delivered:
            self.early.append(batch)
        ref = self._call((np.frombuffer(packed, dtype=np.int64).copy(), None))
        if batch == POISON_BATCH and self.alive:
            self.ray.deaths.append(self.pid)
            self.die()
        return ref

    def die(self) -> None:
        self.alive = False
        for ref in self.undelivered:
            ref.error = ActorDied(f"actor pid {self.pid} died")
        self.ray.failed.extend(self.undelivered)
        self.undelivered = []


class _Method:
    def __init__(self, call: Any):
        self.remote = call


class FakeRay:
    exceptions = type("exceptions", (), {"RayError": RayError, "RayTaskError": RayTaskError})

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken  # every actor fails in its constructor
        self.starting: set[int] = set()  # pids of actors still starting: nothing of theirs arrives yet
        self.pids = itertools.count(9_000_001)  # no such process here: ``stop`` finds none to wait for
        self.actors: list[FakeActor] = []
        self.deaths: list[int] = []
        self.failed: list[Ref] = []

    def get_runtime_context(self) -> Any:
        return type("Context", (), {"get_node_id": staticmethod(lambda: "node-1")})()

    def put(self, value: Any) -> Ref:
        return Ref(value, delivered=True)

    def remote(self, cls: Any) -> FakeRay:
        return self

    def options(self, **options: Any) -> Any:
        return type("ActorClass", (), {"remote": staticmethod(self._new_actor)})()

    def _new_actor(self, *args: Any) -> FakeActor:
        actor = FakeActor(self, next(self.pids))
        self.actors.append(actor)
        return actor

    def wait(self, refs: list[Ref], num_returns: int, timeout: float) -> tuple[list[Ref], list[Ref]]:
        for actor in self.actors:  # the answers in flight arrive now
            if actor.pid in self.starting:
                continue
            for ref in actor.undelivered:
                ref.delivered = True
            actor.undelivered = []
        for ref in self.failed:
            ref.delivered = True
        ready = [ref for ref in refs if ref.delivered][:num_returns]
        return ready, [ref for ref in refs if ref not in ready]

    def get(self, refs: Any) -> Any:
        if isinstance(refs, list):
            return [self.get(ref) for ref in refs]
        if refs.error is not None:
            raise refs.error
        return refs.value

    def kill(self, actor: FakeActor, no_restart: bool = True) -> None:
        if actor.alive:
            actor.die()


class NotWoken:
    woken = False

    def fileno(self) -> int:
        return -1


def test_an_actor_gets_no_batch_before_its_hello_is_answered_so_a_poison_batch_names_the_actor_it_killed(
    monkeypatch,
):
    # A regression test. Batches used to be queued behind an actor's hello: a poison batch killed the actor
    # before the hello's answer was delivered, and the run took the death for an actor that could not start
    # (a PrefetchError) instead of the batch's (a WorkerDiedError naming the actor's pid).
    from prefetch.ray_executor.run import RayRun

    ray = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    config = make_config((np.arange(64),), batch_size=4, shuffle=False, epochs=1, workers=2, retries=1, prefetch=4)
    run = RayRun({}, True, config, 0, NotWoken())
    results: list[Any] = []
    for _ in range(20):  # each ``wait`` delivers what is in flight: a few are enough, 20 bounds a loop
        results += run.wait(0.0)
        if any(isinstance(result, Unmade) for result in results):
            break
    run.stop()
    given_up = [result for result in results if isinstance(result, Unmade)]
    assert [result.batch for result in given_up] == [POISON_BATCH], results
    error = given_up[0].error
    assert isinstance(error, prefetch.WorkerDiedError) and error.batch == POISON_BATCH, error
    assert error.pid == ray.deaths[-1] and f"pid {error.pid}" in str(error), (error, ray.deaths)
    assert f"killed {config.retries + 1} worker(s)" in str(error), str(error)
    assert {result.batch for result in results if isinstance(result, Made)} <= {0, 1, 2}


def _run(ray: FakeRay, monkeypatch: Any, samples: int, prefetch: int = 4) -> Any:
    from prefetch.ray_executor.run import RayRun

    monkeypatch.setitem(sys.modules, "ray", ray)
    config = make_config((np.arange(samples),), batch_size=4, shuffle=False, epochs=1, workers=2, prefetch=prefetch)
    return RayRun({}, True, config, 0, NotWoken())


def test_batches_go_to_an_actor_in_the_wait_that_brings_its_hello(monkeypatch):
    ray = FakeRay()
    run = _run(ray, monkeypatch, 12)  # batches 0, 1, 2: none of them the poison batch
    assert [actor.batches for actor in ray.actors] == [[], []]  # no hello answered yet: no batch sent
    assert run.wait(0.0) == []  # the hellos arrive ...
    assert sorted(b for actor in ray.actors for b in actor.batches) == [0, 1, 2]  # ... and the batches go out
    assert all(actor.batches for actor in ray.actors), [actor.batches for actor in ray.actors]
    assert [actor.early for actor in ray.actors] == [[], []]
    made = run.wait(0.0)
    run.stop()
    assert sorted(result.batch for result in made if isinstance(result, Made)) == [0, 1, 2], made


def test_an_actor_that_dies_before_its_hello_is_a_start_up_error(monkeypatch):
    ray = FakeRay(broken=True)
    run = _run(ray, monkeypatch, 64)
    with pytest.raises(prefetch.PrefetchError, match="a Ray actor of the loader could not start") as caught:
        run.wait(0.0)
    run.stop()
    assert not isinstance(caught.value, prefetch.WorkerError)
    assert [actor.batches for actor in ray.actors] == [[], []]
