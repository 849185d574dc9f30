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
from helpers import (
    FailsToUnpickle,
    Fault,
    FaultyTransform,
    alive,
    all_gone,
    loader_processes,
    reap,
    run_script,
    segments_of,
    wait_until,
)

import prefetch
from prefetch.ipc.ending import pidfd_of, same_process_alive, start_ticks

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
    engine = loader._holder.engine
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


# --- what a closed loader still holds in this process -----------------------------------------------------


def held_here() -> tuple[set[str], int, int]:
    """This process's open descriptors (number -> target), threads and mappings of prefetch segments."""
    descriptors = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            descriptors.add(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:  # the one listdir used
            pass
    with open("/proc/self/maps") as maps:
        mapped = sum(1 for line in maps if "/prefetch-" in line)
    return descriptors, len(os.listdir("/proc/self/task")), mapped


@pytest.mark.timeout(120)
def test_closed_loaders_that_are_still_referenced_hold_no_descriptor_thread_or_mapping(start_method):
    def use(loader: prefetch.Loader) -> None:
        for number, _ in enumerate(loader):
            if number == 2:
                break

    use(prefetch.Loader(DATA, batch_size=8, workers=1, start_method=start_method))  # imports, forkserver, ...
    before_fds, before_threads, _ = held_here()
    loaders = []
    for _ in range(20):
        loader = prefetch.Loader(DATA, batch_size=8, workers=2, start_method=start_method)
        use(loader)
        loader.close()
        loaders.append(loader)  # still referenced: nothing may wait for the garbage collector
    after_fds, after_threads, mapped = held_here()
    assert after_fds - before_fds == set(), sorted(after_fds - before_fds)
    assert (after_threads, mapped) == (before_threads, 0)
    assert all("closed" in repr(loader) for loader in loaders)


def test_a_coordinator_that_cannot_be_started_leaves_no_descriptor(monkeypatch):
    """fork() fails with EAGAIN when the process limit is reached: the error is the user's to see, and
    the pipes made for the coordinator are closed again."""
    import errno

    import multiprocess.process

    def no_more_processes(self):
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    use = prefetch.Loader(DATA, batch_size=8, workers=1)
    next(iter(use))  # imports and the like, before counting
    use.close()
    before, _, _ = held_here()
    monkeypatch.setattr(multiprocess.process.BaseProcess, "start", no_more_processes)
    loader = prefetch.Loader(DATA, batch_size=8, workers=2)
    with pytest.raises(OSError, match="temporarily unavailable") as info:
        next(iter(loader))
    loader.close()
    after, _, _ = held_here()  # the error is still referenced (its frames too): no collector helps
    assert after - before == set(), sorted(after - before)
    assert not segments_of(os.getpid()) and info.value.errno == errno.EAGAIN


@pytest.mark.start_methods("spawn")
def test_a_coordinator_that_fails_while_starting_leaves_no_descriptor(start_method):
    """The coordinator dies unpickling its source: ``CoordinatorDiedError``, and nothing of it is left here."""
    use = prefetch.Loader(DATA, batch_size=8, workers=1, start_method=start_method)
    next(iter(use))
    use.close()
    before, _, _ = held_here()
    loader = prefetch.Loader(FailsToUnpickle(), batch_size=8, workers=2, start_method=start_method)
    with pytest.raises(prefetch.CoordinatorDiedError, match="cannot be unpickled here") as info:
        next(iter(loader))
    loader.close()
    after, _, _ = held_here()
    assert after - before == set(), sorted(after - before)
    assert "__setstate__" in str(info.value)  # the traceback says where it failed


# --- how the workers end --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_after_a_complete_run_every_worker_stops_on_its_own(start_method):
    loader = prefetch.Loader(DATA, batch_size=8, workers=2, epochs=1, start_method=start_method)
    engine = None
    for _ in loader:
        engine = engine or loader.engine
    assert engine is not None and not loader_processes()
    executor = engine.run
    assert len(executor.worker_exits) == 2 and set(executor.worker_exits.values()) == {0}, executor.worker_exits
    assert executor.coordinator.exitcode == 0
    loader.close()


@pytest.mark.timeout(60)
def test_an_early_close_kills_only_the_worker_stuck_in_a_transform_and_is_prompt(tmp_path):
    """Batches 0-6 are taken; batch 7, the last, hangs in its transform. The other worker has nothing left
    to make: it is idle, and stops when told. Only the stuck one is killed."""
    marker = tmp_path / "stuck"
    transform = FaultyTransform(Fault(60, "hang", str(marker)))  # sample 60 is in batch 7
    loader = prefetch.Loader(
        DATA[:64], np.arange(64), batch_size=8, shuffle=False, epochs=1, workers=2, prefetch=8, transform=transform
    )
    iterator = iter(loader)
    for _ in range(7):
        next(iterator)
    engine = loader.engine
    assert engine is not None
    wait_until(marker.exists, timeout_s=20)
    workers = engine.worker_pids()
    closing = time.monotonic()
    loader.close()
    assert time.monotonic() - closing < 1.5  # no waiting for the stuck worker
    exits = engine.run.worker_exits
    assert sorted(exits.values()) == [-signal.SIGKILL, 0], exits
    assert set(exits) == set(workers)
    assert engine.run.coordinator.exitcode == 0


# --- a process is known by more than its pid ----------------------------------------------------------------


def test_a_pid_names_a_process_only_together_with_its_start_time():
    """A pid is handed out again once its process is reaped: the start time tells the processes apart."""
    me, ticks = os.getpid(), start_ticks(os.getpid())
    assert ticks is not None and same_process_alive(me, ticks)
    assert not same_process_alive(me, ticks + 1)  # this pid, but another process: "ours" is gone
    fd = pidfd_of(me, ticks)
    assert fd is not None
    os.close(fd)
    assert pidfd_of(me, ticks + 1) is None
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        os._exit(0)
    child_ticks = start_ticks(child)
    os.waitpid(child, 0)  # reaped: its pid is free for the next process
    assert start_ticks(child) != child_ticks and pidfd_of(child, child_ticks) is None


def test_a_coordinator_whose_consumer_is_another_process_by_now_stops_at_once():
    """The coordinator is given the consumer's pid and start time; a process with that pid and another
    start time (the consumer died and its pid was reused) is not the consumer: nothing is started."""
    import multiprocess

    from prefetch.processes.coordinator import Coordinator
    from prefetch.processes.worker import worker_main

    config = prefetch.Loader(DATA, batch_size=8, workers=2).config
    control_in, control = multiprocess.Pipe(duplex=False)
    results, results_out = multiprocess.Pipe(duplex=False)
    me, ticks = os.getpid(), start_ticks(os.getpid())
    assert ticks is not None
    try:
        for consumer, gone in [((me, ticks + 1), True), ((me, ticks), False)]:
            coordinator = Coordinator(control_in, results_out, config, "prefetch-none-", 0, consumer, worker_main)
            assert coordinator.consumer_gone is gone and (coordinator.consumer_exit is None) is gone
            if gone:
                coordinator.run()  # returns at once: no worker started for a consumer that is gone
                assert not coordinator.workers
            coordinator.selector.close()
            coordinator.outbox.close()
            if coordinator.consumer_exit is not None:
                os.close(coordinator.consumer_exit)
    finally:
        for conn in (control_in, control, results, results_out):
            conn.close()
