"""The consumer's engines over their life: the registry closed at exit, forks, waking a blocked thread.

* ``live_engines`` and ``close_all_engines``: every running ``consumer.Engine`` is stopped at
  interpreter exit, by an ``atexit`` hook that runs before multiprocess's own (which would
  otherwise wait forever for a coordinator nobody told to stop).
* A child forked by user code forgets its parent's engines (``os.register_at_fork``): nothing at
  the child's exit may touch the parent's coordinator, pipes or segments.
* ``WakePipe``: how ``close()`` in one thread wakes a ``next()`` blocked in a selector in another.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from typing import Any

import multiprocess.util  # noqa: F401 - its atexit hook must be registered before ours (below)

live_engines: weakref.WeakSet[Any] = weakref.WeakSet()  # the engines running in this process


def close_all_engines() -> None:
    """Stop every running engine (at interpreter exit, before multiprocess joins its children)."""
    for engine in list(live_engines):
        engine.close()


# atexit runs hooks last-in, first-out: ours (registered after multiprocess was imported) runs first.
atexit.register(close_all_engines)


def _forget_engines_in_forked_child() -> None:
    """In a forked child, the parent's engines are the parent's: forget them, so that nothing at this
    process's exit touches them -- neither our atexit hook nor multiprocess's, which would try to
    join the parent's coordinators (they are in its list of children, copied by the fork)."""
    for engine in list(live_engines):
        engine.forget_in_forked_child()
    live_engines.clear()


os.register_at_fork(after_in_child=_forget_engines_in_forked_child)


class WakePipe:
    """A pipe that any thread writes to wake a thread waiting on ``fileno()`` in a selector.

    ``wake`` sets ``woken`` first, so the waiting thread can tell why it woke. Once ``close``d it
    writes nothing (the descriptor numbers may belong to something else by then).
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()
        self._closed = False
        self.woken = False

    def fileno(self) -> int:
        return self._read

    def wake(self) -> None:
        with self._lock:
            self.woken = True
            if self._closed:
                return
            try:
                os.write(self._write, b"!")
            except OSError:  # woken already: the pipe is full
                pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read)
                os.close(self._write)
