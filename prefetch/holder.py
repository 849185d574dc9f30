"""The loader's engine, in a holder its finalizer can reach without the loader.

An engine belongs to the generator that started or adopted it (``owner``) while that generator
runs. When an epoch iteration ends at its epoch boundary with epochs still to come, the engine
is *parked* (no owner): its processes keep going, so the next ``iter(loader)`` in the same
thread adopts it and starts without a process start-up and with its prefetch window full.
It is stopped by ``close()``, ``load_state_dict``, a generator closed or dropped mid-epoch,
the end of the loader's last epoch, the loader's finalizer and the atexit hook
(``consumer.live_engines``). See docs/design.md ("Epochs").
"""

from __future__ import annotations

import threading
import time
from typing import Generic, Protocol, TypeVar

from .stats import Stats, StatsRecorder


class HeldEngine(Protocol):
    """What the holder needs of an engine (``consumer.Engine``, ``consumer.InlineEngine``)."""

    @property
    def position(self) -> int: ...

    @property
    def recorder(self) -> StatsRecorder: ...

    def stats(self) -> Stats: ...

    def close(self) -> None: ...


E = TypeVar("E", bound=HeldEngine)


def final_stats(engine: HeldEngine) -> Stats | None:
    """An engine's figures as it stops or parks (a courtesy: never let them stop a shutdown)."""
    try:
        return engine.stats()
    except Exception:
        return None


class EngineHolder(Generic[E]):
    """The loader's engine, running or parked, and who owns it.

    Threads: ``install``, ``adopt``, ``park`` and ``take`` swap the engine and its owner under a
    lock, so exactly one caller gets a running engine to close; ``Engine.close`` wakes and waits
    for a thread blocked in it. ``thread`` is the thread that last took a batch through the owner.
    """

    def __init__(self) -> None:
        self.engine: E | None = None
        self.last: E | None = None  # for stats() after it stopped
        self.final: Stats | None = None  # the figures as the last engine stopped (see ``stop``)
        self.owner: object | None = None  # the generator that runs it; None while parked
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def install(self, engine: E, owner: object) -> None:
        with self._lock:
            self.engine, self.owner, self.thread = engine, owner, threading.current_thread()

    def adopt(self, owner: object, position: int) -> bool:
        """Hand a parked engine that continues at ``position`` to ``owner``, in the thread that parked it
        (the thread tuner works in the loop's own thread). False: there is none to adopt."""
        with self._lock:
            engine = self.engine
            if (
                engine is None
                or self.owner is not None
                or engine.position != position
                or self.thread is not threading.current_thread()
            ):
                return False
            self.owner = owner
            engine.recorder.paused = None  # its clocks run again
            auto = getattr(engine, "auto", None)  # workers="auto" (consumer.Engine): no window spans the pause
            if auto is not None:
                auto.restart()
            return True

    def park(self) -> None:
        """The owner's epoch ended and more are to come: keep the engine running, owned by nobody, its
        figures' clocks stopped (``stats()`` gives them as the epoch ended) until an iteration adopts it."""
        with self._lock:
            engine, self.owner = self.engine, None
            if engine is not None:
                engine.recorder.paused = (time.perf_counter(), time.process_time())

    def take(self) -> E | None:
        """Remove the engine (to close it); None if there is none."""
        with self._lock:
            engine, self.engine, self.owner = self.engine, None, None
            if engine is not None:
                self.last = engine
            return engine

    def stop(self, keep_stats: bool = False) -> bool:
        """Stop the engine; with ``keep_stats``, first take its figures, so that ``stats()`` after the loop
        still has the workers' CPU and memory (their processes are gone after this) and an elapsed time
        that ends with the iteration, not whenever the user asks. True if there was one to stop."""
        engine = self.take()
        if engine is None:
            return False
        self.final = final_stats(engine) if keep_stats else None
        engine.close()
        return True
