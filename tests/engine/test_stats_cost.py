"""``stats()`` is cheap whatever runs on the machine (issue 18, item 16): it reads the loader's own
processes in /proc and nothing else -- no scan of every process to find the workers -- so a monitor
calling it every epoch costs the same on a busy machine. Counted, not timed: every open of a /proc file
and every listing of a directory while ``stats()`` runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import prefetch

# The audit hook below sees every open() and os.listdir()/os.scandir() of this process; it records
# only while a list is installed here (a hook cannot be removed, so it stays and does nothing).
_seen: list[tuple[str, str]] | None = None


def _audit(event: str, args: tuple) -> None:
    if _seen is None or event not in ("open", "os.listdir", "os.scandir"):
        return
    path = args[0] if args else None
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    if isinstance(path, str) and path.startswith("/proc"):
        _seen.append((event, path))


sys.addaudithook(_audit)


def proc_reads(call) -> list[tuple[str, str]]:
    """What ``call()`` opened and listed under /proc."""
    global _seen
    _seen = []
    try:
        call()
        return list(_seen)
    finally:
        _seen = None


def pid_of(path: str) -> str:
    return path.split("/")[2] if path.count("/") >= 2 else ""


@pytest.mark.timeout(60)
def test_stats_reads_only_the_loaders_processes_however_many_run():
    with prefetch.Loader(np.arange(200.0), batch_size=10, workers=2, seed=0) as loader:
        batches = loader.stream()
        next(batches)
        engine = loader.engine
        assert engine is not None
        own = {"self", "thread-self", str(os.getpid()), str(engine.helper_pid())}
        own |= {str(pid) for pid in engine.worker_pids()}
        assert len(own) == 6  # the consumer, the coordinator and both workers are known
        loader.stats()  # the first call imports what it needs
        quiet = proc_reads(loader.stats)
        sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(100)]
        try:
            busy = proc_reads(loader.stats)
            stats = loader.stats()
        finally:
            for sleeper in sleepers:
                sleeper.send_signal(signal.SIGKILL)
                sleeper.wait()
    assert not [path for event, path in busy if event != "open" and pid_of(path) not in own], busy  # no /proc scan
    assert {pid_of(path) for _, path in busy} <= own
    assert len(busy) == len(quiet)  # 100 more processes on the machine: not one more read
    assert {f"worker {pid}" for pid in engine.worker_pids()} <= set(stats.memory)


@pytest.mark.timeout(30)
def test_stats_follow_a_worker_that_was_replaced():
    with prefetch.Loader(np.arange(2000.0), batch_size=10, workers=2, seed=0) as loader:
        batches = loader.stream()
        next(batches)
        engine = loader.engine
        assert engine is not None
        victim = engine.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        for _ in batches:  # the coordinator's WorkerLost names the replacement; the timeout bounds the wait
            if victim not in engine.worker_pids():
                break
        workers = engine.worker_pids()
        memory = loader.stats().memory
    assert victim not in workers and len(workers) == 2
    assert {f"worker {pid}" for pid in workers} <= set(memory)  # the replacement is alive and measured
