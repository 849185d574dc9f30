"""Who dies with whom: a process of the engine lives as long as the consumer *process* that owns it,
whichever of the consumer's threads started it, and ends promptly once that process dies -- even while it
runs user code.

Linux's parent-death signal (``PR_SET_PDEATHSIG``) fires when the *thread* that started a process ends,
not the process: a ``background`` producer or a loader started from a thread that then ends must go on
(``lifetime.exit_with_parent``; the coordinator watches the consumer's process through a pidfd).
"""

from __future__ import annotations

import os
import signal
import threading
import warnings

import numpy as np
import pytest
from helpers import alive, all_gone, reap, run_script, segments_of, wait_until

import prefetch

DATA = np.arange(48 * 4, dtype=np.float32).reshape(48, 4)
SUBPROCESS_TIMEOUT_S = 30.0
DEADLINE_S = 20.0  # for a subprocess to reach a state it must reach (imports and start-up included)
# For the processes of a killed consumer to end: far below the hour the producer would otherwise sleep, far above
# a spawned interpreter's teardown and spawn's resource tracker's clean-up on a busy machine (one CI run: > 20 s).
GONE_S = 60.0

BACKGROUND_FROM_A_THREAD = """
import functools, os, sys, threading, time
import psutil
import prefetch

def items(go, busy):
    yield os.getpid()
    while not os.path.exists(go):  # the second item is made only after the starting thread has ended
        time.sleep(0.01)
    yield "second"
    open(busy, "w").close()
    time.sleep(3600)  # in user code when the consumer is killed: only the parent-death signal ends it
    yield "never"

if __name__ == "__main__":
    method, go, busy = sys.argv[1:4]
    if method == "fork":  # the default
        gen = prefetch.background(items(go, busy))
    else:
        gen = prefetch.background(functools.partial(items, go, busy), start_method=method)
    first = []
    starter = threading.Thread(target=lambda: first.append(next(gen)))
    starter.start()
    starter.join()
    print(first[0], flush=True)
    open(go, "w").close()
    print(next(gen), flush=True)
    print(*[child.pid for child in psutil.Process().children(recursive=True)], flush=True)
    time.sleep(3600)
"""


def read_line(process) -> str:
    line = process.stdout.readline()
    if not line:
        process.kill()
        _, err = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        pytest.fail(f"the consumer script failed:\n{err}")
    return line.strip()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_producer_outlives_the_thread_that_started_it_and_dies_with_its_process(tmp_path, start_method):
    go, busy = tmp_path / "go", tmp_path / "busy"
    process = run_script(tmp_path, "consumer.py", BACKGROUND_FROM_A_THREAD, start_method, str(go), str(busy))
    pids: list[int] = []
    try:
        producer = int(read_line(process))
        assert read_line(process) == "second"  # made after the starting thread had ended
        pids = [int(pid) for pid in read_line(process).split()]  # the producer (and spawn's resource tracker)
        assert producer in pids
        wait_until(busy.exists, DEADLINE_S)  # the producer is in user code (a long sleep)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(SUBPROCESS_TIMEOUT_S)
        # Without the parent-death signal the producer would sleep for an hour in user code, so any bound
        # well below that tells the behaviour apart; a tight one only races interpreter teardown on a busy
        # machine (spawn's resource tracker also waits for the producer to close its pipe, then cleans up).
        wait_until(all_gone(pids, process.pid), GONE_S, what="the producer (and spawn's tracker) gone")
    finally:
        reap(process, pids, SUBPROCESS_TIMEOUT_S)


def test_a_loader_started_in_a_thread_that_ends_goes_on_in_another(start_method):
    """One generator resumed from another thread after the first has ended: same coordinator and workers,
    same batches."""
    options = {"batch_size": 8, "epochs": 2, "seed": 4}
    with prefetch.Loader(DATA, workers=0, **options) as reference:
        expected = [batch.tolist() for batch in reference.stream()]
    loader = prefetch.Loader(DATA, workers=2, start_method=start_method, **options)
    batches = loader.stream()
    got: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", prefetch.PrefetchWarning)  # the main thread runs while it forks
        starter = threading.Thread(target=lambda: got.append(next(batches).tolist()))
        starter.start()
        starter.join()
    assert loader.engine is not None
    processes = (loader.engine.helper_pid(), sorted(loader.engine.worker_pids()))
    while len(got) < len(expected) - 1:
        got.append(next(batches).tolist())
    assert (loader.engine.helper_pid(), sorted(loader.engine.worker_pids())) == processes
    got.extend(batch.tolist() for batch in batches)
    assert got == expected
    assert loader.stats().restarts == 0
    loader.close()


LOADER_FROM_A_THREAD = """
import sys, threading, time
import numpy as np
import psutil
import prefetch

if __name__ == "__main__":
    loader = prefetch.Loader(np.zeros((64, 4), np.float32), batch_size=4, workers=2, start_method=sys.argv[1])
    batches = loader.stream()
    starter = threading.Thread(target=lambda: next(batches))
    starter.start()
    starter.join()
    next(batches)
    print(*[child.pid for child in psutil.Process().children(recursive=True)], flush=True)
    time.sleep(3600)
"""


@pytest.mark.timeout(60)
def test_a_loader_started_in_an_ended_thread_dies_with_its_process(tmp_path, start_method):
    process = run_script(tmp_path, "consumer.py", LOADER_FROM_A_THREAD, start_method)
    pids: list[int] = []
    try:
        pids = [int(pid) for pid in read_line(process).split()]
        assert len(pids) >= 3 and all(alive(pid) for pid in pids)  # the coordinator, two workers (+ helpers)
        assert segments_of(process.pid)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(SUBPROCESS_TIMEOUT_S)
        # Without the parent-death signal the producer would sleep for an hour in user code, so any bound
        # well below that tells the behaviour apart; a tight one only races interpreter teardown on a busy
        # machine (spawn's resource tracker also waits for the producer to close its pipe, then cleans up).
        wait_until(all_gone(pids, process.pid), GONE_S, what="the producer (and spawn's tracker) gone")
    finally:
        reap(process, pids, SUBPROCESS_TIMEOUT_S)


@pytest.mark.timeout(30)
def test_a_second_parent_death_signal_does_not_cut_the_clean_up_short(monkeypatch):
    """The kernel's parent-death signal and the watcher thread's both arrive (``exit_with_parent``): the first
    unwinds to the clean-up, the second must not raise inside it (a producer's lock file was left, 1 run in 7).
    Here in this process: the parent's end is faked (``getppid``), and the signals are sent by hand."""
    from prefetch.ipc import lifetime

    monkeypatch.setattr(lifetime, "_prctl", lambda *args: None)  # no real request to the kernel
    monkeypatch.setattr(lifetime, "_signal_main_when_gone", lambda parent, main: None)  # no watcher
    previous = signal.getsignal(lifetime.PARENT_DEATH_SIGNAL)
    parent = os.getppid()
    cleaned = []
    try:
        lifetime.exit_with_parent(parent)
        os.kill(os.getpid(), lifetime.PARENT_DEATH_SIGNAL)  # the parent is still there: nothing happens
        monkeypatch.setattr(lifetime.os, "getppid", lambda: parent + 1)  # handed on: the parent has ended
        with pytest.raises(SystemExit) as exited:
            try:
                os.kill(os.getpid(), lifetime.PARENT_DEATH_SIGNAL)
            finally:
                os.kill(os.getpid(), lifetime.PARENT_DEATH_SIGNAL)  # the second, during the clean-up
                cleaned.append("done")
        assert exited.value.code == lifetime.PARENT_DIED_EXIT
    finally:
        signal.signal(lifetime.PARENT_DEATH_SIGNAL, previous)
    assert cleaned == ["done"]
