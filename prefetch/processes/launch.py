"""The coordinator process as the consumer sees it: started, known, ended.

``CoordinatorProcess`` starts the coordinator with the loader's start method and the two pipes
between them (control, results), and notes what could make a fork deadlock: the other threads
running at that moment. It knows the coordinator by its multiprocess sentinel and as an unreaped
child -- never by a pid alone, which the system hands out again once a process is reaped -- and
ends it: ``stop`` (asked, then killed) or ``kill`` (stuck, stopped, or slower to start than
``timeout``). Either way the coordinator's workers, orphans once it is gone (they die with it,
``PR_SET_PDEATHSIG``), are waited for through pidfds, and ``close`` then lets go of every
descriptor the coordinator held here. The messages that explain a killed coordinator are here too.

See ``docs/design.md`` ("Who writes to whom, and who may wait", "Shutdown").
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

import multiprocess
import psutil

from ..core.config import LoaderConfig
from ..errors import describe_exit
from ..ipc.channel import Outbox
from ..ipc.ending import children_pidfds, close_process, join_or_kill, start_ticks, wait_pidfds
from ..ipc.lifetime import native_threads, other_threads, sigint_ignored
from .spawn import pickle_config, share_sources

# How long a coordinator told to stop may take (it gives its workers ``coordinator.WORKER_JOIN_TIMEOUT_S``).
COORDINATOR_JOIN_TIMEOUT_S = 3.0


def thread_census() -> tuple[list[str], int]:
    """This process's other Python threads (names), and how many threads it runs besides this one in
    all: native pools (torch's, OpenMP's) are threads Python does not list."""
    names = other_threads()
    return names, len(names) + native_threads()


class Roles(NamedTuple):
    """The entry points of the processes a run starts: handed in by the template (``processes/__init__``),
    so that the consumer's end, the coordinator and the worker never import each other."""

    coordinator: Callable[..., None]  # ``coordinator.coordinator_main``
    worker: Callable[..., None]  # ``worker.worker_main``, handed on to the coordinator


class CoordinatorProcess:
    """One coordinator process, from its start to the closing of everything it held in the consumer."""

    def __init__(self, config: LoaderConfig, start: int, prefix: str, roles: Roles):
        ctx = multiprocess.get_context(config.start_method)
        self.method = str(ctx.get_start_method())
        self.timeout = config.timeout
        forked = self.method == "fork"
        if not forked:
            config = replace(config, sources=share_sources(config.sources, prefix))
        self.threads = thread_census() if forked else ([], 0)  # what ran at the fork
        consumer = (os.getpid(), start_ticks(os.getpid()))  # a pid and a start time: one process for good
        control_in, self.control = ctx.Pipe(duplex=False)
        self.results, results_out = ctx.Pipe(duplex=False)
        try:
            shipped = config if forked else pickle_config(config)
            self.process = ctx.Process(
                target=roles.coordinator,
                args=(control_in, results_out, shipped, prefix, start, consumer, roles.worker),
                name="prefetch-coordinator",
            )
            with sigint_ignored():  # a Ctrl-C while it boots is the consumer's alone
                self.process.start()
        except BaseException:
            self.control.close()
            self.results.close()
            raise
        finally:
            control_in.close()
            results_out.close()
        self.pid: int = self.process.pid
        self.exitcode: int | None = None
        self.closed = False
        try:  # readable once it has exited; its sentinel waits for every copy to close (its workers')
            self.exit_fd: int | None = os.pidfd_open(self.pid)  # an unreaped child: the pid is its own
        except (AttributeError, OSError):  # pragma: no cover - no pidfds: the sentinel
            self.exit_fd = None

    @property
    def ended_fd(self) -> int:
        """A descriptor that is readable once it has ended."""
        return self.exit_fd if self.exit_fd is not None else int(self.process.sentinel)

    def alive(self) -> bool:
        """Still running (and so not reaped: its pid is its own until this process reaps it)."""
        if self.closed or self.exitcode is not None:
            return False
        self.exitcode = self.process.exitcode  # reaps it if it has ended
        return self.exitcode is None

    def state(self) -> str:
        """Its scheduler state ('sleeping', 'stopped', 'disk-sleep', ...), or how it ended."""
        if not self.alive():
            return "ended"
        try:
            return str(psutil.Process(self.pid).status())  # safe: an unreaped child keeps its pid
        except psutil.Error:
            return "ended"

    def _workers_pidfds(self) -> list[int]:
        if not self.alive():
            return []
        try:
            return children_pidfds(self.pid)
        except (AttributeError, OSError):  # pragma: no cover - no pidfds (Linux < 5.3): not waited for
            return []

    def _reap(self, timeout_s: float) -> None:
        join_or_kill([self.process], timeout_s)
        self.exitcode = self.process.exitcode

    def kill(self) -> None:
        """Kill it (its workers die with it) and wait until all are gone."""
        workers = self._workers_pidfds()
        self.process.kill()
        self._reap(COORDINATOR_JOIN_TIMEOUT_S)
        wait_pidfds(workers, COORDINATOR_JOIN_TIMEOUT_S)

    def stop(self, control: Outbox, stop_frame: bytes) -> None:
        """Send ``stop_frame`` (a ``Stop``); after ``COORDINATOR_JOIN_TIMEOUT_S`` in all it is killed.
        Its workers, which it stops itself, are waited for in case it was killed."""
        if self.closed:
            return
        workers = self._workers_pidfds()
        try:
            control.put(stop_frame)
            control.flush_within(COORDINATOR_JOIN_TIMEOUT_S / 2)
        except OSError:  # the coordinator is gone already
            pass
        self._reap(COORDINATOR_JOIN_TIMEOUT_S / 2)
        wait_pidfds(workers, COORDINATOR_JOIN_TIMEOUT_S)

    def join(self, timeout_s: float) -> None:
        """It is dying (its pipes closed, or it has exited): wait up to ``timeout_s`` for the end, to tell how."""
        if self.closed:
            return
        if self.exit_fd is not None:
            select.select([self.exit_fd], [], [], timeout_s)
        else:  # pragma: no cover - no pidfds
            self.process.join(timeout_s)
        self.exitcode = self.process.exitcode  # reaps it if it has ended

    def close(self) -> None:
        """Close its pipes and its sentinel here (it has ended)."""
        if not self.closed:
            self.closed = True
            self.control.close()
            self.results.close()
            close_process(self.process)
            if self.exit_fd is not None:
                os.close(self.exit_fd)

    def forget(self) -> None:
        """In a forked child: take it off multiprocess's list of this process's children (copied by
        the fork; the child's exit would try to join it)."""
        children = getattr(multiprocess.process, "_children", None)
        if children is not None:
            children.discard(self.process)

    # --- what the user is told ----------------------------------------------------------------

    def died_text(self) -> str:
        return f"the coordinator process (pid {self.pid}) {describe_exit(self.exitcode)}; the loader cannot go on"

    def start_timeout_text(self, state: str) -> str:
        """Why the engine did not start within ``timeout``, and what to do."""
        head = (
            f"the loader's engine did not start within timeout={self.timeout}s: its coordinator process (pid "
            f"{self.pid}, state: {state}) had not started its workers, and was killed. "
        )
        if self.method != "fork":
            return head + (
                f"It was started by {self.method}: before it starts its workers it imports prefetch and unpickles "
                "the configuration -- the sources, the transforms and the modules they need -- and that took "
                "longer (a slow import, a source that loads its data when unpickled, a blocked read). Fix: a "
                "larger timeout, or sources that are cheap to unpickle (open files lazily, in __getitem__)"
            )
        names, count = self.threads
        if not count:
            return head + (
                "It was forked while no other thread ran in this process, so it inherited no lock held: something "
                "else held it up (an os.register_at_fork hook, a machine under heavy load). A larger timeout "
                'allows a slow start; start_method="spawn" does not fork'
            )
        shown = ", ".join(repr(name) for name in names[:5]) + (", ..." if len(names) > 5 else "")
        native = count - len(names)
        who = f"{count} other thread{'s' if count > 1 else ''} ran in this process" + (f" ({shown})" if names else "")
        if native > 0:
            who += f", {native} of them not started by Python (a native pool: torch's, OpenMP's)"
        return head + (
            f"It was forked while {who}: a fork from a multi-threaded process can deadlock -- a lock one of "
            "those threads held at that moment (torch's, logging's, a thread pool's) stays locked in the child "
            'forever. Fix: start_method="spawn" or "forkserver" (the coordinator is forked at every start of '
            "the engine, so creating the loader early does not help)"
        )
