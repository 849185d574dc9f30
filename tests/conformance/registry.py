"""The executors every contract of the conformance suite runs on: one ``Entry`` each, in ``ENTRIES``.

A new executor gets the whole suite by adding one entry at the end of ``ENTRIES`` (see README.md):
how to build a loader on it (``options``), what it needs to run here (a module that must import,
fixtures that start it, marks that select the environment that has it), how to lose one of its
workers, what of it can be seen while it runs and must be gone after (``footprint``), and which
contracts do not apply to it, with the reason the test report shows.

Everything an entry reads from inside prefetch goes through ``adapter``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import adapter
import multiprocess
import pytest
from helpers import DEFAULT_START_METHODS, alive

import prefetch

# Contract names (the ``contract`` mark of each test; an entry may say one does not apply to it).
STREAM = "stream"
CALLER_RNG = "caller-rng"
RESUME = "resume"
BOUND = "bound"
HELD_BATCHES = "held-batches"
LOST_WORKER = "lost-worker"
USER_ERROR = "user-error"
WORKER_DIED = "worker-died"
TIMEOUT = "timeout"
LIFECYCLE = "lifecycle"
CACHE = "cache"
CONTRACTS = (
    STREAM,
    CALLER_RNG,
    RESUME,
    BOUND,
    HELD_BATCHES,
    LOST_WORKER,
    USER_ERROR,
    WORKER_DIED,
    TIMEOUT,
    LIFECYCLE,
    CACHE,
)


class Footprint(NamedTuple):
    """What of a running loader can be seen from the test: its processes, its segments, its actors."""

    pids: frozenset[int] = frozenset()
    segments: frozenset[str] = frozenset()
    actors: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.pids or self.segments or self.actors)


def remains(seen: Footprint) -> list[str]:
    """What of ``seen`` is still there, and any segment this process still maps or holds open."""
    left = [f"process {pid}" for pid in sorted(seen.pids) if alive(pid)]
    left += [f"segment {name}" for name in sorted(seen.segments) if adapter.segment_exists(name)]
    if seen.actors:
        left += [f"actor {actor}" for actor in sorted(seen.actors & adapter.ray_actors_alive())]
    left += [f"mapping {line}" for line in sorted(adapter.segments_mapped_here())]
    left += [f"descriptor {fd}" for fd in sorted(adapter.segment_descriptors_here())]
    return left


def segment_strays() -> list[str]:
    """Any segment of a loader of this process, or a mapping of or a descriptor to one, left here."""
    left = [f"segment {name}" for name in sorted(adapter.segments_here())]
    left += [f"mapping {line}" for line in sorted(adapter.segments_mapped_here())]
    return left + [f"descriptor {fd}" for fd in sorted(adapter.segment_descriptors_here())]


def ray_strays() -> list[str]:
    """Any loader actor alive (a test runs its Ray loaders one at a time, and closes them)."""
    return [f"actor {actor}" for actor in sorted(adapter.ray_actors_alive())]


def engine_pids(loader: prefetch.Loader) -> frozenset[int]:
    """The running engine's workers on this machine and its helper process (the coordinator), if any."""
    engine = loader.engine
    if engine is None or not hasattr(engine, "worker_pids"):  # stopped, or workers=0: no process
        return frozenset()
    pids = set(engine.worker_pids())
    helper = engine.helper_pid()
    if helper is not None:
        pids.add(helper)
    return frozenset(pids)


def processes_footprint(loader: prefetch.Loader) -> Footprint:
    return Footprint(pids=engine_pids(loader), segments=frozenset(adapter.segments_here()))


def ray_footprint(loader: prefetch.Loader) -> Footprint:
    """The actors alive now are this loader's: a test runs one Ray loader at a time."""
    return Footprint(pids=engine_pids(loader), actors=frozenset(adapter.ray_actors_alive()))


def sigkill(loader: prefetch.Loader, pid: int) -> None:
    """Lose worker ``pid`` as the OOM killer would (a Ray actor's process the same way: its node's
    raylet then reports the actor dead, as tests/ray do)."""
    engine = loader.engine
    assert engine is not None and hasattr(engine, "worker_pids"), "no engine with workers is running"
    assert pid in engine.worker_pids(), f"pid {pid} is not one of the loader's workers {engine.worker_pids()}"
    os.kill(pid, signal.SIGKILL)


INLINE_HAS_NO_WORKER = "workers=0 makes every batch in the calling process, when asked: there is no worker"


@dataclass(frozen=True)
class Entry:
    """One executor, as the suite builds, faults and inspects it."""

    name: str  # the test id
    options: Mapping[str, Any]  # the Loader options that put a loader on it
    marks: tuple[Any, ...] = ()  # select the environment that has what it needs (pytest -m ...)
    requires: str | None = None  # a module that must import, else the rows skip saying so
    fixtures: tuple[str, ...] = ()  # fixtures that start it (a Ray instance)
    not_applicable: Mapping[str, str] = field(default_factory=dict)  # contract -> why not
    forks_the_caller: bool = False  # start_method="fork": the test process is forked
    threads_in_the_caller: bool = False  # it runs threads in the test process: forking it is unsafe
    lose_worker: Callable[[prefetch.Loader, int], None] = sigkill
    footprint: Callable[[prefetch.Loader], Footprint] = processes_footprint
    strays: Callable[[], list[str]] = segment_strays  # what any closed loader of it may have left
    # The most seconds a lost worker, a hung batch's kill, or a stop may take to be over.
    settle_s: float = 10.0

    def loader(self, *sources: Any, **options: Any) -> prefetch.Loader:
        return prefetch.Loader(*sources, **{**options, **self.options})

    def start(self, request: pytest.FixtureRequest) -> None:
        """Make sure it can run here: its module imports, its fixtures are up."""
        if self.requires is not None:
            pytest.importorskip(self.requires, reason=f"the {self.name} rows need {self.requires}, not installed here")
        for name in self.fixtures:
            request.getfixturevalue(name)


def _processes(method: str) -> Entry:
    return Entry(
        name=f"processes-{method}",
        options={"executor": "processes", "workers": 2, "start_method": method},
        forks_the_caller=method == "fork",
    )


# --- the registry: a new executor adds its entry here --------------------------------------------------------

ENTRIES: tuple[Entry, ...] = (
    Entry(
        name="inline",
        options={"workers": 0},
        not_applicable={
            STREAM: "workers=0 is the reference stream every other executor is compared with",
            BOUND: "workers=0 makes each batch when it is asked for: nothing is made ahead to bound",
            LOST_WORKER: INLINE_HAS_NO_WORKER,
            WORKER_DIED: INLINE_HAS_NO_WORKER + " (a death there is the caller's own)",
            TIMEOUT: INLINE_HAS_NO_WORKER + " (timeout bounds a batch made elsewhere)",
        },
    ),
    *(_processes(method) for method in DEFAULT_START_METHODS if method in multiprocess.get_all_start_methods()),
    Entry(
        name="ray",
        options={"executor": "ray", "workers": 2},
        marks=(pytest.mark.ray,),
        requires="ray",
        fixtures=("local_ray",),
        threads_in_the_caller=True,
        footprint=ray_footprint,
        strays=ray_strays,
        settle_s=20.0,  # an actor's death goes through its raylet and the GCS
    ),
)


def rows(contract: str) -> list[Any]:
    """The executors as ``pytest.param``s for a test of ``contract``: those it does not apply to are
    marked skip with the reason (shown by ``-ra``), never left out silently."""
    return [pytest.param(entry, id=entry.name, marks=_marks(contract, entry)) for entry in ENTRIES]


def pairs(contract: str) -> list[Any]:
    """Every ordered pair of executors (state saved on the first, loaded on the second)."""
    params = []
    for first in ENTRIES:
        for second in ENTRIES:
            marks = _marks(contract, first, second)
            if any(e.forks_the_caller for e in (first, second)) and any(
                e.threads_in_the_caller for e in (first, second)
            ):
                why = "forking a process in which Ray runs threads is unsafe: the pair runs with spawn instead"
                marks.append(pytest.mark.skip(reason=f"not applicable to {first.name} -> {second.name}: {why}"))
            params.append(pytest.param(first, second, id=f"{first.name}->{second.name}", marks=marks))
    return params


def _marks(contract: str, *entries: Entry) -> list[Any]:
    assert contract in CONTRACTS, f"unknown contract {contract!r}: one of {CONTRACTS}"
    marks = [mark for entry in entries for mark in entry.marks]
    for entry in entries:
        if contract in entry.not_applicable:
            reason = f"not applicable to {entry.name}: {entry.not_applicable[contract]}"
            marks.append(pytest.mark.skip(reason=reason))
    return marks
