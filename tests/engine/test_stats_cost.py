"""``stats()`` is cheap whatever runs on the machine (issue 18, item 16): it reads the loader's own
processes in /proc and nothing else -- no scan of every process to find the workers -- so a monitor
calling it every epoch costs the same on a busy machine. Counted, not timed: every open of a /proc file
and every listing of a directory while ``stats()`` runs."""

from __future__ import annotations

import builtins
import os
import signal
import subprocess

import numpy as np
import pytest

import prefetch


def proc_reads(monkeypatch, call) -> list[tuple[str, str]]:
    """What ``call()`` opened (``open``) and listed (``os.listdir``, ``os.scandir``) under /proc: psutil
    reads /proc through these."""
    seen: list[tuple[str, str]] = []

    def watching(name: str, original):
        def watched(path, *args, **kwargs):
            text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
            if text.startswith("/proc"):
                seen.append((name, text))
            return original(path, *args, **kwargs)

        return watched

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", watching("open", builtins.open))
        patch.setattr(os, "listdir", watching("os.listdir", os.listdir))
        patch.setattr(os, "scandir", watching("os.scandir", os.scandir))
        call()
    return seen


def pid_of(path: str) -> str:
    return path.split("/")[2] if path.count("/") >= 2 else ""


@pytest.mark.timeout(60)
def test_stats_reads_only_the_loaders_processes_however_many_run(monkeypatch):
    with prefetch.Loader(np.arange(200.0), batch_size=10, workers=2, seed=0) as loader:
        batches = loader.stream()
        next(batches)
        engine = loader.engine
        assert engine is not None
        own = {"self", "thread-self", str(os.getpid()), str(engine.helper_pid())}
        own |= {str(pid) for pid in engine.worker_pids()}
        assert len(own) == 6  # the consumer, the coordinator and both workers are known
        loader.stats()  # the first call imports what it needs
        quiet = proc_reads(monkeypatch, loader.stats)
        sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(100)]
        try:
            busy = proc_reads(monkeypatch, loader.stats)
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
