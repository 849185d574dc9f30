"""How processes end, and how one is known to have ended: one shutdown escalation for every process
of ours, and a process known by more than its pid (which the system hands out again once the process
is reaped).

* ``join_or_kill``: wait, then SIGKILL, then wait for the end -- for workers, coordinators and
  ``background``'s producer alike (their callers hold the timeouts); ``close_process`` lets go of an
  ended process's descriptors.
* ``pidfd_of`` (a pidfd names one process for its life; the start time, ``start_ticks``, checks that
  it is the one meant), ``children_pidfds`` and ``wait_pidfds`` for processes that are not our
  children (an orphaned worker), ``same_process_alive`` where pidfds do not exist.

See ``docs/design.md`` ("Shutdown").
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterable
from typing import Any

import psutil


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
