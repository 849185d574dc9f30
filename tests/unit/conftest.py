"""The unit tier starts no process: a test here that starts one (a loader with workers, a subprocess, a
fork) fails, so that ``pytest tests/unit`` stays fast and runs anywhere."""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess

import multiprocess.process
import psutil
import pytest


@pytest.fixture(autouse=True)
def no_process_started(monkeypatch):
    started: list[str] = []

    def spy(owner, name: str, what: str) -> None:
        original = getattr(owner, name)

        def record(*args, **kwargs):
            started.append(what)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, record)

    spy(multiprocess.process.BaseProcess, "start", "a multiprocess Process")
    spy(multiprocessing.process.BaseProcess, "start", "a multiprocessing Process")
    spy(subprocess.Popen, "_execute_child", "a subprocess")
    spy(os, "fork", "os.fork()")
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    yield
    after = {child.pid for child in psutil.Process().children(recursive=True)}
    assert not started, f"a unit test started {', '.join(sorted(set(started)))}: it belongs in tests/engine"
    assert after <= before, f"a unit test left child processes {sorted(after - before)}: it belongs in tests/engine"
