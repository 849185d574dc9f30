"""Lifecycle: however the consumer stops -- or dies -- every process ends and every segment is unlinked.

In-process cases stop a running loader (break, del, garbage collection, an exception inside ``with``,
``gen.close()``, ``gen.throw()``) and then poll, with a deadline, until its coordinator and workers are
gone and no ``/dev/shm`` segment of this process is left. Parent SIGKILL and Ctrl-C run a consumer in
a subprocess (a script in ``tmp_path``) that prints its loader's pids, then kill or interrupt it.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import alive, all_gone, loader_processes, reap, run_script, segments_of, wait_until

import prefetch

DATA = np.arange(400 * 8, dtype=np.float32).reshape(400, 8)
# "within a couple of seconds": the coordinator polls its parent every 0.25 s and gives its
# workers 1 s to stop; the consumer gives the coordinator 3 s before killing it.
GONE_WITHIN_S = 3.0
SUBPROCESS_TIMEOUT_S = 30.0


def running_loader(**options) -> tuple[prefetch.Loader, object, list[int]]:
    """A loader, its generator after one batch, and its processes (checked to be running, with segments)."""
    loader = prefetch.Loader(DATA, **{"batch_size": 8, "seed": 1, "workers": 2, **options})
    gen = iter(loader)
    next(gen)
    pids = loader_processes()
    assert len(pids) == 3 and all(alive(pid) for pid in pids)  # the coordinator and two workers
    assert segments_of(os.getpid())
    return loader, gen, pids


def assert_stopped(pids: list[int]) -> None:
    wait_until(all_gone(pids, os.getpid()), GONE_WITHIN_S)


# --- the consumer stops early -------------------------------------------------------------------------


def test_break_out_of_a_for_loop():
    loader = prefetch.Loader(DATA, batch_size=8, workers=2)
    pids: list[int] = []
    for _ in loader:
        pids = loader_processes()
        assert len(pids) == 3
        break
    assert_stopped(pids)
    assert loader.position == 1
    loader.close()


def test_del_the_generator():
    loader, gen, pids = running_loader()
    del gen
    assert_stopped(pids)
    loader.close()


def test_del_a_data_generator():
    gen = prefetch.data_generator(8, DATA, np.arange(len(DATA)), workers=2)
    next(gen)
    pids = loader_processes()
    assert len(pids) == 3
    del gen
    assert_stopped(pids)


def test_garbage_collection_of_a_generator_in_a_reference_cycle():
    loader, gen, pids = running_loader()
    cycle: dict = {"gen": gen}
    cycle["self"] = cycle
    del gen, cycle
    time.sleep(0.3)  # nothing may stop it before the collector runs ...
    assert all(alive(pid) for pid in pids)
    gc.collect()  # ... and the collector must
    assert_stopped(pids)
    loader.close()


def test_garbage_collection_of_an_unclosed_loader():
    loader, gen, pids = running_loader()
    cycle: dict = {"loader": loader, "gen": gen}
    cycle["self"] = cycle
    del loader, gen, cycle
    gc.collect()
    assert_stopped(pids)


def test_an_exception_inside_with():
    pids: list[int] = []
    with pytest.raises(ZeroDivisionError), prefetch.Loader(DATA, batch_size=8, workers=2) as loader:
        for _ in loader:
            pids = loader_processes()
            _ = 1 / 0
    assert len(pids) == 3
    assert_stopped(pids)


def test_gen_close():
    loader, gen, pids = running_loader()
    gen.close()
    assert_stopped(pids)
    with pytest.raises(StopIteration):
        next(gen)
    loader.close()


@pytest.mark.parametrize("exception", [ValueError, KeyboardInterrupt])
def test_gen_throw(exception):
    loader, gen, pids = running_loader()
    with pytest.raises(exception):
        gen.throw(exception("from the training loop"))
    assert_stopped(pids)
    loader.close()


def test_close_twice_is_a_no_op_and_a_closed_loader_says_so():
    loader, gen, pids = running_loader()
    loader.close()
    assert_stopped(pids)
    loader.close()
    for use in (lambda: iter(loader), lambda: next(gen), lambda: loader.load_state_dict(loader.state_dict())):
        with pytest.raises(prefetch.LoaderClosedError, match="closed"):
            use()
    assert isinstance(prefetch.LoaderClosedError("x"), RuntimeError)
    assert "closed" in repr(loader)


def test_closing_the_loader_stops_a_generator_in_use():
    loader, gen, pids = running_loader()
    loader.close()
    assert_stopped(pids)
    with pytest.raises(prefetch.LoaderClosedError, match="closed"):
        next(gen)


def test_a_finished_finite_loader_stops_its_processes_by_itself():
    loader = prefetch.Loader(DATA, batch_size=8, workers=2, epochs=1)
    gen = iter(loader)
    next(gen)
    pids = loader_processes()
    assert len(pids) == 3
    assert sum(1 for _ in gen) == len(loader) - 1
    assert_stopped(pids)
    loader.close()


# --- the coordinator dies -----------------------------------------------------------------------------


def test_a_killed_coordinator_is_a_clear_error_promptly():
    loader, gen, pids = running_loader(prefetch=2)
    engine = loader._running.engine
    assert engine is not None
    coordinator = engine.helper_pid()
    assert coordinator in pids
    os.kill(coordinator, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(prefetch.CoordinatorDiedError) as info:
        while time.monotonic() - killed < 30:  # batches already made may still come first
            next(gen)
    assert time.monotonic() - killed < GONE_WITHIN_S
    assert f"pid {coordinator}" in str(info.value) and "SIGKILL" in str(info.value)
    assert_stopped(pids)  # its workers die with it, and the consumer unlinks the segments
    with pytest.raises(StopIteration):
        next(gen)
    loader.close()


# --- the parent dies; Ctrl-C ----------------------------------------------------------------------------

CONSUMER_SCRIPT = """
import os
import sys
import time

import numpy as np
import psutil

import prefetch

if __name__ == "__main__":
    data = np.arange(400 * 8, dtype=np.float32).reshape(400, 8)
    loader = prefetch.Loader(data, batch_size=8, seed=1, workers=2, start_method=sys.argv[1])
    for count, batch in enumerate(loader.stream()):
        if count == 3:
            pids = [child.pid for child in psutil.Process().children(recursive=True)]
            print(" ".join(map(str, pids)), flush=True)
        time.sleep(0.01)  # a training step
"""


def start_consumer(tmp_path, start_method: str) -> tuple[subprocess.Popen, list[int]]:
    """A consumer in a subprocess (its own session, like a program run from a shell), and its loader's pids."""
    process = run_script(tmp_path, "consumer.py", CONSUMER_SCRIPT, start_method)
    line = process.stdout.readline()  # type: ignore[union-attr]
    if not line:
        process.kill()
        _, err = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        pytest.fail(f"the consumer script failed:\n{err}")
    pids = [int(pid) for pid in line.split()]
    assert len(pids) >= 3 and all(alive(pid) for pid in pids)  # the coordinator, two workers (+ spawn's tracker)
    assert segments_of(process.pid)
    return process, pids


def test_parent_killed_leaves_no_process_and_no_segment(tmp_path, start_method):
    process, pids = start_consumer(tmp_path, start_method)
    try:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(SUBPROCESS_TIMEOUT_S)
        wait_until(all_gone(pids, process.pid), GONE_WITHIN_S)
    finally:
        reap(process, pids, SUBPROCESS_TIMEOUT_S)


@pytest.mark.parametrize("to", ["process group", "consumer"])
def test_ctrl_c_ends_the_program_promptly_without_worker_tracebacks(tmp_path, start_method, to):
    """A terminal's Ctrl-C sends SIGINT to the whole foreground process group; ``kill -INT`` to one process."""
    process, pids = start_consumer(tmp_path, start_method)
    try:
        if to == "process group":
            os.killpg(process.pid, signal.SIGINT)
        else:
            os.kill(process.pid, signal.SIGINT)
        interrupted = time.monotonic()
        _, err = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        assert time.monotonic() - interrupted < GONE_WITHIN_S, err
        assert process.returncode != 0
        wait_until(all_gone(pids, process.pid), GONE_WITHIN_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert err.rstrip().endswith("KeyboardInterrupt"), err
    assert err.count("Traceback (most recent call last)") == 1, err  # the consumer's only
    assert "prefetch-worker" not in err and "prefetch-coordinator" not in err, err


STARTING_CONSUMER_SCRIPT = """
import os
import sys
import time

import prefetch


class SlowToUnpickle:
    '''A source whose unpickling -- in the coordinator, before it runs any prefetch code -- takes a second
    and first touches the file ``started``: the test interrupts the program inside that window.'''

    def __init__(self, started):
        self.started = started

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return i

    def __setstate__(self, state):
        self.__dict__.update(state)
        open(self.started, "w").close()
        for _ in range(100):
            time.sleep(0.01)


if __name__ == "__main__":
    loader = prefetch.Loader(SlowToUnpickle(sys.argv[2]), batch_size=4, workers=1, start_method=sys.argv[1])
    for batch in loader.stream():
        time.sleep(0.01)
"""


@pytest.mark.start_methods("spawn", "forkserver")
def test_ctrl_c_while_the_coordinator_starts_prints_no_traceback_from_it(tmp_path, start_method):
    started = tmp_path / "started"
    process = run_script(tmp_path, "starting.py", STARTING_CONSUMER_SCRIPT, start_method, str(started))
    try:
        wait_until(started.exists, timeout_s=20)  # the coordinator is unpickling its source now
        os.killpg(process.pid, signal.SIGINT)
        interrupted = time.monotonic()
        _, err = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        assert time.monotonic() - interrupted < GONE_WITHIN_S, err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    wait_until(lambda: not segments_of(process.pid), GONE_WITHIN_S)
    assert err.rstrip().endswith("KeyboardInterrupt"), err
    assert err.count("Traceback (most recent call last)") == 1, err  # the consumer's only
