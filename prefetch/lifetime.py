"""How a process of the engine lives and ends: one place for every OS-level process helper, used by
the ``processes`` executor, ``background`` and the Ray actors alike.

* ``die_with_parent``: Linux kills this process when its parent dies (``PR_SET_PDEATHSIG``);
  ``wake_on_time``: timed waits in user code end within 1 us of their deadline.
* ``ignore_sigint`` / ``sigint_ignored``: Ctrl-C is the consumer's alone to handle.
* ``batch_scheduling`` / ``normal_scheduling``: the coordinator's wake-ups do not preempt the loop.
* ``limit_threads``: one BLAS/OpenMP thread per worker.
* ``join_or_kill``: the one shutdown escalation -- wait, then SIGKILL, then wait for the end --
  used for workers, coordinators and ``background``'s producer alike; ``wait_ended`` for
  processes that are not our children (an orphaned worker).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import psutil

_PR_SET_PDEATHSIG = 1
_PR_SET_TIMERSLACK = 29
# Linux lets a timed wait (time.sleep, a poll with a timeout) overshoot by the thread's
# timer slack, 50 us by default: 2.5 % of a 2 ms wait. Workers that wait on storage or a
# network with timeouts should wake on time; the cost is a few more timer interrupts.
WORKER_TIMER_SLACK_NS = 1000

# How often a process that waits for messages checks that its parent is still alive (where
# ``die_with_parent`` does not exist, or the parent died before it was called).
PARENT_CHECK_INTERVAL_S = 0.25

# How long a worker told to stop may take before it is killed.
WORKER_JOIN_TIMEOUT_S = 1.0
# How long a coordinator told to stop may take (it gives its workers WORKER_JOIN_TIMEOUT_S).
COORDINATOR_JOIN_TIMEOUT_S = 3.0
# How long ``background``'s producer told to stop may take: it notices ``Stop`` only between
# items, so it is given time to finish the one its iterable is making.
PRODUCER_JOIN_TIMEOUT_S = 2.0

# The environment variables the common BLAS and OpenMP runtimes read when they start.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def _prctl(option: int, value: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies. Callers also poll their
    parent: this is Linux only."""
    _prctl(_PR_SET_PDEATHSIG, sig)


def wake_on_time(timer_slack_ns: int = WORKER_TIMER_SLACK_NS) -> None:
    """Keep this thread's timed waits within ``timer_slack_ns`` of their deadline (a worker or an
    actor whose transform waits on storage or a network with timeouts)."""
    _prctl(_PR_SET_TIMERSLACK, timer_slack_ns)


def ignore_sigint() -> None:
    """Ctrl-C is the consumer's to handle: the engine's processes are stopped by its shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while a child starts: a spawned interpreter inherits the disposition, so a
    Ctrl-C during its start-up does not print a second traceback from the child. (Only the main
    thread may change signal handlers; elsewhere this does nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def batch_scheduling(enabled: bool = True) -> None:
    """Run this process under Linux's SCHED_BATCH policy (or back under the normal one):
    the coordinator then does not preempt the training loop each time a message wakes it,
    which on a machine with few cores costs the consumer more than the message itself."""
    try:
        policy = os.SCHED_BATCH if enabled else os.SCHED_OTHER
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        pass


def normal_scheduling() -> None:
    """Back to the normal policy (a worker inherits the coordinator's): a worker waking from I/O
    should run at once."""
    batch_scheduling(enabled=False)


def limit_threads() -> None:
    """One BLAS/OpenMP thread per worker, so N workers do not oversubscribe the cores: for the
    runtimes already loaded (threadpoolctl) and for those a transform loads later (environment)."""
    for name in THREAD_ENV_VARS:
        os.environ[name] = "1"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency; only the environment then
        return
    threadpool_limits(1)


def join_or_kill(processes: Iterable[Any], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` in all for ``processes`` (``multiprocess.Process`` objects, already
    asked to stop) to end; SIGKILL whichever has not, and wait up to ``timeout_s`` more for those."""
    processes = list(processes)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(timeout_s)


def _ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def wait_ended(processes: list[psutil.Process], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` until every one of ``processes`` has ended. A zombie has: an orphaned
    worker stays one until init reaps it, which can take a second (``psutil.wait_procs`` waits for that)."""
    deadline = time.monotonic() + timeout_s
    while not all(_ended(process) for process in processes) and time.monotonic() < deadline:
        time.sleep(0.01)


def import_before_forking(limit_threads: bool) -> None:
    """Import what every worker needs once, in the process that forks them, so that they inherit it:
    numpy imports ``numpy.random`` lazily (13 ms here, on the path to the first batch otherwise twice:
    the coordinator's first dispatch, then each worker's first seeding)."""
    import numpy.random  # noqa: F401

    if limit_threads:
        try:
            import threadpoolctl  # noqa: F401
        except ImportError:  # pragma: no cover - a dependency
            pass
