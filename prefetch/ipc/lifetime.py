"""How a process of ours lives: one place for the OS mechanics of a process's life, used by the
``processes`` executor, ``background`` and the Ray actors alike (how it ends: ``ending``).

* ``die_with_parent`` / ``exit_with_parent``: Linux signals this process when its parent dies
  (``PR_SET_PDEATHSIG``). The signal comes when the *thread* that started the process ends, so
  ``die_with_parent`` is only for a process started by its parent's only thread (a worker, by its
  coordinator); a process that a multi-threaded parent starts from any thread (``background``'s
  producer) uses ``exit_with_parent``, which ignores the end of a mere thread.
* ``ignore_sigint`` / ``sigint_ignored``: Ctrl-C is the consumer's alone to handle.
* ``batch_scheduling`` / ``normal_scheduling``: a coordinator's wake-ups do not preempt the loop.
* ``wake_on_time``, ``limit_threads``, ``one_torch_thread``, ``first_to_go_under_memory_pressure`` and
  ``worker_prologue``: what a process that runs user code does first (timed waits on time, one BLAS/OpenMP
  and torch thread, stepped back, the OOM killer's first pick).
* Threads at a fork: ``other_threads``, ``native_threads`` and ``fork_hazard`` (what may hold a lock
  that a forked process would find locked forever), ``warn_threads_before_fork``.

See ``docs/design.md`` ("Shutdown": who dies with whom; "Sharing the cores with the training step").
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
from collections.abc import Iterator
from typing import Any

from ..errors import warn

_PR_SET_PDEATHSIG = 1
_PR_SET_TIMERSLACK = 29
# Linux lets a timed wait (time.sleep, a poll with a timeout) overshoot by the thread's
# timer slack, 50 us by default: 2.5 % of a 2 ms wait. Workers that wait on storage or a
# network with timeouts should wake on time; the cost is a few more timer interrupts.
WORKER_TIMER_SLACK_NS = 1000

# A worker's oom_score_adj (-1000 .. 1000; the kernel's OOM killer adds it to each process's share of memory,
# in thousandths, and kills the highest): the most, so that under memory pressure a worker goes before the
# training process, whatever their sizes. A killed worker's batches are redone (as any SIGKILLed worker's);
# the training process is not. The cost: a worker may die where another process of the machine would have.
WORKER_OOM_SCORE_ADJ = 1000

# The signal ``exit_with_parent`` asks for: a real-time one that nothing else sends, so that its handler
# knows it comes from Linux's parent-death request (a SIGTERM may come from anyone).
PARENT_DEATH_SIGNAL = signal.SIGRTMIN + 3 if hasattr(signal, "SIGRTMIN") else signal.SIGTERM
# How a process ends when its parent died: as a SIGTERM would end it.
PARENT_DIED_EXIT = 128 + signal.SIGTERM

# How often a process that waits for messages checks that its parent is still alive (where
# ``die_with_parent`` does not exist, or the parent died before it was called).
PARENT_CHECK_INTERVAL_S = 0.25

# The environment variables the common BLAS and OpenMP runtimes read when they start (set to 1 in a
# process with ``limit_threads``; ``doctor`` shows the ones the user set).
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
    The handler exits only once ``getppid()`` is no longer ``parent_pid``.

    The kernel may hand that signal to any thread of this process (a BLAS pool's thread, when the main
    thread has one pending already: a parent whose threads end one by one signals once per thread), and
    only the main thread runs Python's handler and is woken by it from a sleep in user code. So a watcher
    thread (``_signal_main_when_gone``) also waits for the parent's end and then signals the main thread.
    The signal may so come twice: only the first raises, so that the second cannot cut short the clean-up
    the first unwinds to (a producer's ``unlink_prefix``, whose lock file would be left)."""
    exiting = False

    def on_parent_death(signum: int, frame: Any) -> None:
        nonlocal exiting
        if os.getppid() != parent_pid and not exiting:
            exiting = True
            raise SystemExit(PARENT_DIED_EXIT)

    signal.signal(PARENT_DEATH_SIGNAL, on_parent_death)
    _prctl(_PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL)
    if os.getppid() != parent_pid:  # it died before the request was made
        raise SystemExit(PARENT_DIED_EXIT)
    main = threading.get_ident()
    threading.Thread(
        target=_signal_main_when_gone, args=(parent_pid, main), name="prefetch-parent-watch", daemon=True
    ).start()


def _signal_main_when_gone(parent_pid: int, main: int) -> None:
    """Wait until this process's parent ``parent_pid`` has ended (a pidfd where Linux has them, else a
    check every ``PARENT_CHECK_INTERVAL_S``), then send ``PARENT_DEATH_SIGNAL`` to the main thread."""
    try:
        pidfd: int | None = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):  # pragma: no cover - before Linux 5.3, or it has ended already
        pidfd = None
    if pidfd is not None:
        try:
            if os.getppid() == parent_pid:  # the pidfd is the parent's, not a later process's with its pid
                watch = select.poll()  # not select(): a descriptor past 1023 is legal here
                watch.register(pidfd, select.POLLIN)
                watch.poll()  # readable once it has ended
        finally:
            os.close(pidfd)
    while os.getppid() == parent_pid:  # without a pidfd; with one, until this process has been handed on
        time.sleep(PARENT_CHECK_INTERVAL_S)
    signal.pthread_kill(main, PARENT_DEATH_SIGNAL)


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


def first_to_go_under_memory_pressure(score_adj: int = WORKER_OOM_SCORE_ADJ) -> None:
    """Make the kernel's OOM killer pick this process before the training process: a worker's death is
    repaired (its batches are redone), the training process's is not. Raising one's own score needs no
    privilege; a score already higher is kept. Nothing where ``/proc`` has no such file."""
    path = "/proc/self/oom_score_adj"
    try:
        with open(path) as current:
            if int(current.read()) >= score_adj:
                return
        with open(path, "w") as raised:
            raised.write(str(score_adj))
    except (OSError, ValueError):  # pragma: no cover - not Linux, or a read-only /proc
        pass


def worker_prologue(nice: int | str, limit: bool, *, ignore_interrupts: bool = True) -> None:
    """What every process that runs user code to make batches does first, wherever it runs (a forked
    worker, a Ray actor): Ctrl-C is left to the consumer (``ignore_interrupts``; Ray handles its own
    signals), timed waits end on time (``wake_on_time``: this thread's), the normal scheduling policy
    (not its parent's), an int ``nice`` steps it back from the training step (``"auto"``: it starts level,
    and the consumer decides later), the OOM killer takes it first (``first_to_go_under_memory_pressure``),
    and ``limit`` gives it one BLAS/OpenMP thread and one torch thread (``limit_threads``). See
    ``docs/design.md``, "Where a new executor goes"."""
    if ignore_interrupts:
        ignore_sigint()
    wake_on_time()
    normal_scheduling()
    if isinstance(nice, int) and nice > 0:
        os.nice(nice)
    first_to_go_under_memory_pressure()
    if limit:
        limit_threads()


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


# --- threads at a fork ----------------------------------------------------------------------------


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


# Runtimes whose own native threads may hold a lock when the process forks, so that a forked process
# that calls them hangs: (module, name). JAX says so itself at every fork; TensorFlow's thread pools too.
FORK_UNSAFE_RUNTIMES = (("tensorflow", "TensorFlow"), ("jax", "JAX"))


def fork_unsafe_runtimes(torch_in_child: bool) -> list[str]:
    """The loaded runtimes whose threads can leave a forked process hanging; torch's only if the forked
    process runs torch with its inherited setting (``torch_in_child``; see ``one_torch_thread``)."""
    loaded = [name for module, name in FORK_UNSAFE_RUNTIMES if module in sys.modules]
    return loaded + (["PyTorch"] if torch_in_child and "torch" in sys.modules else [])


def fork_hazard(torch_in_child: bool) -> str | None:
    """What runs in this process besides the calling thread that may hold a lock at a fork, or None."""
    python = other_threads()
    runtimes = fork_unsafe_runtimes(torch_in_child)
    native = native_threads() if runtimes else 0
    found = []
    if python:
        names = ", ".join(repr(name) for name in python[:5]) + (", ..." if len(python) > 5 else "")
        found.append(f"{len(python)} more thread{'s' if len(python) > 1 else ''} running in this process ({names})")
    if native:
        found.append(
            f"{native} native thread{'s' if native > 1 else ''} with {' and '.join(runtimes)} loaded "
            f"({len(os.listdir('/proc/self/task'))} OS threads in all)"
        )
    return " and ".join(found) if found else None


def fork_warning(hazard: str, forked: str) -> str:
    """The warning's first half: ``hazard`` (``fork_hazard``) and what it means for ``forked``."""
    return (
        f"{hazard} when {forked} is forked: a lock one of them holds at that moment stays locked in "
        f"{forked}, which hangs if it needs it (the library the lock belongs to, called by your code)"
    )


def warn_threads_before_fork(forked: str, fix: str) -> None:
    """Warn (``PrefetchWarning``) if ``fork_hazard`` finds something, for a process that forks ``forked``
    without a loader configuration (``background``'s producer: it runs torch with one thread)."""
    hazard = fork_hazard(torch_in_child=False)
    if hazard is not None:
        warn(f"{fork_warning(hazard, forked)}; {fix}")
