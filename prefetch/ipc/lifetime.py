"""How a process of the engine lives and ends: one place for every OS-level process helper, used by
the ``processes`` executor, ``background`` and the Ray actors alike.

* ``die_with_parent`` / ``exit_with_parent``: Linux signals this process when its parent dies
  (``PR_SET_PDEATHSIG``). The signal comes when the *thread* that started the process ends, so
  ``die_with_parent`` is only for a process started by its parent's only thread (a worker, by its
  coordinator); a process that a multi-threaded parent starts from any thread (``background``'s
  producer) uses ``exit_with_parent``, which ignores the end of a mere thread. See ``docs/design.md``,
  *Shutdown* (who dies with whom).
* ``wake_on_time``: timed waits in user code end within 1 us of their deadline.
* ``ignore_sigint`` / ``sigint_ignored``: Ctrl-C is the consumer's alone to handle.
* ``batch_scheduling`` / ``normal_scheduling``: the coordinator's wake-ups do not preempt the loop.
* ``limit_threads``: one BLAS/OpenMP thread per worker; ``one_torch_thread``: the one torch setting
  that works in a forked process; ``worker_prologue``: all a batch-making process does first.
* ``join_or_kill``: the one shutdown escalation -- wait, then SIGKILL, then wait for the end --
  used for workers, coordinators and ``background``'s producer alike; ``close_process`` lets go
  of an ended process's descriptors.
* Knowing a process by more than its pid, which the system reuses once the process is reaped:
  ``pidfd_of`` (a pidfd names one process for its life; the start time, ``start_ticks``, checks
  that it is the one meant), ``children_pidfds`` and ``wait_pidfds`` for processes that are not
  our children (an orphaned worker), ``same_process_alive`` where pidfds do not exist.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
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

# The signal ``exit_with_parent`` asks for: a real-time one that nothing else sends, so that its handler
# knows it comes from Linux's parent-death request (a SIGTERM may come from anyone).
PARENT_DEATH_SIGNAL = signal.SIGRTMIN + 3 if hasattr(signal, "SIGRTMIN") else signal.SIGTERM
# How a process ends when its parent died: as a SIGTERM would end it.
PARENT_DIED_EXIT = 128 + signal.SIGTERM

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
    parent: this is Linux only.

    Linux sends it when the *thread* that started this process ends, even if the parent process goes
    on: only for a process that its parent's only thread started (a worker: the coordinator is
    single-threaded). Otherwise use ``exit_with_parent``."""
    _prctl(_PR_SET_PDEATHSIG, sig)


def exit_with_parent(parent_pid: int) -> None:
    """Raise ``SystemExit`` in this process (in its main thread, which must be the caller: it unwinds
    through user code to the caller's clean-up) when the process ``parent_pid``, which started it, ends
    -- whichever of its threads started it, and even while user code runs.

    Linux sends ``PARENT_DEATH_SIGNAL`` when the starting thread ends; the process is then given to
    another thread of the same parent and keeps the request, so the parent's real end signals again.
    The handler exits only once ``getppid()`` is no longer ``parent_pid``."""

    def on_parent_death(signum: int, frame: Any) -> None:
        if os.getppid() != parent_pid:
            raise SystemExit(PARENT_DIED_EXIT)

    signal.signal(PARENT_DEATH_SIGNAL, on_parent_death)
    _prctl(_PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL)
    if os.getppid() != parent_pid:  # it died before the request was made
        raise SystemExit(PARENT_DIED_EXIT)


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


def one_torch_thread() -> None:
    """Give torch, if loaded, one intra-op thread in this forked process. Once the parent has run torch's
    OpenMP pool (GNU libgomp), a forked process hangs on its first parallel operation with any other
    setting -- threadpoolctl's OpenMP limit does not help, torch applies its own (measured: torch 2.13)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def limit_threads() -> None:
    """One BLAS/OpenMP thread per worker, so N workers do not oversubscribe the cores: for the
    runtimes already loaded (threadpoolctl, and torch's own setting) and for those a transform loads
    later (environment)."""
    for name in THREAD_ENV_VARS:
        os.environ[name] = "1"
    one_torch_thread()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency; only the environment then
        return
    threadpool_limits(1)


def worker_prologue(nice: int, limit: bool, *, ignore_interrupts: bool = True) -> None:
    """What every process that runs user code to make batches does first, wherever it runs (a forked
    worker, a Ray actor): Ctrl-C is left to the consumer (``ignore_interrupts``; Ray handles its own
    signals), timed waits end on time (``wake_on_time``: this thread's), the normal scheduling policy
    (not its parent's), ``nice`` steps it back from the training step, and ``limit`` gives it one
    BLAS/OpenMP thread and one torch thread (``limit_threads``). See ``docs/design.md``, "Where a new
    executor goes"."""
    if ignore_interrupts:
        ignore_sigint()
    wake_on_time()
    normal_scheduling()
    if nice:
        os.nice(nice)
    if limit:
        limit_threads()


def join_or_kill(processes: Iterable[Any], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` in all for ``processes`` (``multiprocess.Process`` objects, our children,
    already asked to stop) to end; SIGKILL whichever has not, and wait up to ``timeout_s`` more for those."""
    processes = list(processes)
    _join(processes, timeout_s)
    left = [process for process in processes if process.is_alive()]  # reaps those that ended
    for process in left:
        process.kill()
    _join(left, timeout_s)
    for process in left:
        process.is_alive()


def _join(processes: list[Any], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` until ``processes`` have exited, on pidfds: a pidfd says so as soon as
    the process has exited, while its sentinel waits until every copy of it is closed -- and a process
    it forked (a helper that a transform started) may hold one. Where pidfds do not exist, on sentinels."""
    fds = []
    deadline = time.monotonic() + timeout_s
    for process in processes:
        if process.exitcode is not None:  # ended, and reaped now
            continue
        try:
            fds.append(os.pidfd_open(process.pid))  # an unreaped child: its pid is its own
        except (AttributeError, OSError):  # pragma: no cover - no pidfds
            process.join(max(0.0, deadline - time.monotonic()))
    wait_pidfds(fds, max(0.0, deadline - time.monotonic()))


def close_process(process: Any) -> None:
    """Let go of a ``multiprocess.Process`` that has ended: its sentinel pipe's two descriptors stay
    open until ``Process.close()`` (or until the object is garbage collected). A process still running
    (a kill that did not take yet) keeps them: its object's finalizer closes them later."""
    try:
        process.close()
    except ValueError:
        pass


def start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat``, field 22); None if
    there is no such process. A pid may be reused once its process is reaped; a pid and its start time
    name one process for good."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()  # after the command name, which may hold anything
    return int(fields[19])


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1])


def same_process_alive(pid: int, ticks: int | None) -> bool:
    """Whether the process that is ``pid`` and started at ``ticks`` still runs (a zombie has ended):
    where pidfds do not exist, a poll that a reused pid cannot fool. (``ticks`` None, where there is
    no ``/proc`` to read it from: the pid alone, as the best there is.)"""
    if ticks is None:  # pragma: no cover - no /proc
        try:
            return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False
    state = _state_and_parent(pid)
    return state is not None and state[0] != "Z" and start_ticks(pid) == ticks


def pidfd_of(pid: int, ticks: int | None = None) -> int | None:
    """A pidfd of process ``pid`` -- the one that started at ``ticks``, when given -- readable once it has
    exited; None when that process is gone already. Raises ``OSError`` (or ``AttributeError``) where
    pidfds do not exist (Linux < 5.3, other systems).

    A pidfd names one process for its whole life, whatever happens to its pid later. Opened by pid it
    names the process that had the pid at that moment: reading the start time after opening tells
    whether that was the one meant (it had the pid before and after, so it is the one the pidfd names)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if ticks is not None and start_ticks(pid) != ticks:
        os.close(fd)
        return None
    return fd


def children_pidfds(parent_pid: int) -> list[int]:
    """Pidfds of the children of ``parent_pid``, which must be an unreaped child of this process (so that
    its pid is its own). A child is checked to be one after its pidfd is opened: then the pidfd names it
    even if it died and its pid was reused in between. Raises like ``pidfd_of``."""
    fds = []
    try:
        children = [child.pid for child in psutil.Process(parent_pid).children()]
    except psutil.Error:
        return []
    for pid in children:
        fd = pidfd_of(pid)
        if fd is None:
            continue
        state = _state_and_parent(pid)
        if state is not None and state[1] == parent_pid:
            fds.append(fd)
        else:
            os.close(fd)
    return fds


def wait_pidfds(fds: list[int], timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` until every process of ``fds`` (pidfds) has exited, then close them.
    A zombie has exited: an orphaned worker stays one until init reaps it. True if all had."""
    deadline = time.monotonic() + timeout_s
    pending = list(fds)
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select(pending, [], [], left)
            pending = [fd for fd in pending if fd not in ready]
        return True
    finally:
        for fd in fds:
            os.close(fd)


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


def other_threads() -> list[str]:
    """The names of this process's Python threads other than the calling one."""
    me = threading.current_thread()
    return [t.name for t in threading.enumerate() if t is not me]


def native_threads() -> int:
    """This process's OS threads that are no Python thread: a library's own (a BLAS or OpenMP pool, a
    framework's runtime). 0 where ``/proc/self/task`` cannot be read."""
    try:
        tasks = {int(task) for task in os.listdir("/proc/self/task")}
    except (OSError, ValueError):
        return 0
    return len(tasks - {t.native_id for t in threading.enumerate()})
