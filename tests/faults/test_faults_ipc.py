"""Faults in the engine's own plumbing (issue 10): full pipes, a stopped or killed coordinator, a killed
consumer, a fork in user code, and a loader used from several threads.

Each row injects one fault and asserts what the user sees (the error type and the words that name the
cause, or the correct stream), how long it took, and -- through the autouse ``no_leaks`` fixture --
that no process and no ``/dev/shm`` segment is left. The rules behind them are in ``docs/design.md``
("Who writes to whom", "Shutdown", "Threads and forks").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import multiprocess
import numpy as np
import pytest
from helpers import (
    Fault,
    FaultyTransform,
    ForksAHelperThenHangs,
    alive,
    all_gone,
    loader_processes,
    reap,
    run_script,
    segments_of,
    wait_until,
)

import prefetch
from prefetch.ipc.channel import Outbox

TIMEOUT_S = 2.0
# A fault the engine must see "at once": the time from the fault to the user's error.
DETECTED_S = 2.0
SUBPROCESS_TIMEOUT_S = 30.0

# Index batches of 10,000 samples are 80 KB each: more than a pipe holds.
BIG_BATCH = 10_000
BIG_N = 6 * BIG_BATCH
BIG_DATA = np.zeros((BIG_N, 1), dtype=np.float32)
HUNG_SAMPLE = 2 * BIG_BATCH + 7  # in batch 2 (shuffle=False), after batches that go well


def _raw_frames(fd: int, buffer: bytearray) -> list[bytes]:
    """The whole frames that have arrived on ``fd`` (non-blocking), undecoded; ``buffer`` keeps a partial one."""
    try:
        buffer += os.read(fd, 1 << 16)
    except BlockingIOError:
        return []
    frames, start = [], 0
    while len(buffer) - start >= 4:
        size = int.from_bytes(buffer[start : start + 4], "big")
        if len(buffer) - start - 4 < size:
            break
        frames.append(bytes(buffer[start + 4 : start + 4 + size]))
        start += 4 + size
    del buffer[:start]
    return frames


def first_error(iterator) -> tuple[BaseException, float]:
    """Iterate until ``next()`` raises; the error and how long the ``next()`` that raised it took."""
    while True:
        started = time.monotonic()
        try:
            next(iterator)
        except StopIteration:
            pytest.fail("the stream ended without the fault's error")
        except BaseException as exc:
            return exc, time.monotonic() - started


# --- 1. no process of the engine blocks on a write to another ----------------------------------------


def test_an_outbox_never_blocks_and_delivers_every_frame_in_order():
    """The mechanism: a pipe nobody reads fills up; ``put`` returns at once and keeps the rest, and
    once the reader drains the pipe ``flush`` delivers everything, whole and in order."""
    read_end, write_end = multiprocess.Pipe(duplex=False)
    outbox = Outbox(write_end)
    os.set_blocking(read_end.fileno(), False)
    buffer = bytearray()
    frames = [bytes([i % 251]) * 30_000 for i in range(8)]  # 240 KB: several pipes' worth
    started = time.monotonic()
    for frame in frames:
        outbox.put(frame)
    assert time.monotonic() - started < 0.5 and outbox.pending
    got: list[bytes] = []
    while len(got) < len(frames):
        got += _raw_frames(read_end.fileno(), buffer)
        outbox.flush()
    assert got == frames and not outbox.pending
    read_end.close()
    with pytest.raises(BrokenPipeError):
        outbox.put(b"nobody reads")
    write_end.close()


def test_a_private_outbox_keeps_frames_atomic_and_the_shared_descriptor_blocking():
    """The coordinator's outbox on the results pipe: non-blocking on a description of its own (the
    workers keep blocking writes on theirs), and a frame goes in whole or waits, never in part."""
    read_end, write_end = multiprocess.Pipe(duplex=False)
    outbox = Outbox(write_end, private=True)
    assert outbox.fileno() != write_end.fileno() and os.get_blocking(write_end.fileno())
    frames = [bytes([i]) * 4000 for i in range(40)]  # 160 KB, each frame just under PIPE_BUF
    for frame in frames:
        outbox.put(frame)
    assert outbox.pending
    os.set_blocking(read_end.fileno(), False)
    buffer = bytearray()
    got = _raw_frames(read_end.fileno(), buffer)
    assert not buffer  # what the pipe took were whole frames only
    while outbox.pending:
        outbox.flush()
        got += _raw_frames(read_end.fileno(), buffer)
    got += _raw_frames(read_end.fileno(), buffer)
    assert got == frames
    outbox.close()
    read_end.close()
    write_end.close()


@pytest.mark.timeout(30)
def test_a_hung_sample_in_a_batch_too_big_for_a_pipe_still_times_out_on_time():
    """A worker stuck in a transform, with 80 KB index batches queued for it: the coordinator must
    keep serving (here: the consumer's ``TimedOut``), not block writing to the stuck worker's pipe."""
    transform = FaultyTransform(Fault(HUNG_SAMPLE, "hang"))
    with prefetch.Loader(
        BIG_DATA,
        np.arange(BIG_N),
        batch_size=BIG_BATCH,
        shuffle=False,
        workers=2,
        prefetch=6,
        timeout=TIMEOUT_S,
        transform=transform,
    ) as loader:
        exc, waited = first_error(iter(loader))
    assert isinstance(exc, prefetch.WorkerTimeoutError), repr(exc)
    assert exc.batch == 2 and HUNG_SAMPLE in exc.indices
    assert f"pid {exc.pid}" in str(exc) and f"timeout={TIMEOUT_S}" in str(exc)
    assert waited < TIMEOUT_S + 1.0, waited


@pytest.mark.timeout(30)
def test_a_stopped_coordinator_gives_an_error_within_timeout_on_the_consumers_clock():
    loader = prefetch.Loader(np.arange(400), batch_size=4, shuffle=False, workers=2, prefetch=4, timeout=TIMEOUT_S)
    iterator = iter(loader)
    next(iterator)
    engine = loader.engine
    assert engine is not None
    coordinator = engine.helper_pid()
    os.kill(coordinator, signal.SIGSTOP)
    try:
        exc, waited = first_error(iterator)
    finally:
        if alive(coordinator):
            os.kill(coordinator, signal.SIGCONT)
    assert isinstance(exc, prefetch.CoordinatorTimeoutError), repr(exc)
    assert isinstance(exc, prefetch.CoordinatorDiedError) and isinstance(exc, TimeoutError)
    assert f"pid {coordinator}" in str(exc) and "stopped" in str(exc) and f"timeout={TIMEOUT_S}" in str(exc)
    assert waited < TIMEOUT_S + 1.0, waited
    started = time.monotonic()
    loader.close()
    assert time.monotonic() - started < DETECTED_S


KILLED_CONSUMER_SCRIPT = """
import os
import sys
import time

import numpy as np
import psutil

import prefetch

BATCH = 10_000


def hang_in_batch_1(sample):
    x, i = sample
    if int(i) == BATCH + 3:
        open(sys.argv[2], "w").close()
        time.sleep(3600)
    return x, i


if __name__ == "__main__":
    data = np.zeros((6 * BATCH, 1), dtype=np.float32)
    loader = prefetch.Loader(data, np.arange(len(data)), batch_size=BATCH, shuffle=False, workers=2, prefetch=6,
                             transform=hang_in_batch_1, start_method=sys.argv[1])
    iterator = iter(loader)
    next(iterator)
    pids = [child.pid for child in psutil.Process().children(recursive=True)]
    print(" ".join(map(str, pids)), flush=True)
    next(iterator)  # hangs: the test kills this process now
"""


@pytest.mark.timeout(60)
def test_a_killed_consumer_is_noticed_within_a_second_while_a_worker_hangs(tmp_path, start_method):
    hanging = tmp_path / "hanging"
    process = run_script(tmp_path, "consumer.py", KILLED_CONSUMER_SCRIPT, start_method, str(hanging))
    pids: list[int] = []
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        assert line, process.communicate(timeout=SUBPROCESS_TIMEOUT_S)[1]
        pids = [int(pid) for pid in line.split()]
        wait_until(hanging.exists, timeout_s=20)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(SUBPROCESS_TIMEOUT_S)
        # The coordinator sees the death at once (a pidfd) and kills its workers; here all are gone and
        # the segments unlinked in 0.1-0.25 s. The bound leaves room for a machine under load.
        took = wait_until(all_gone(pids, process.pid), timeout_s=5.0)
        assert took < DETECTED_S, took
    finally:
        reap(process, pids, SUBPROCESS_TIMEOUT_S)


# --- 4c. the coordinator killed between two batches ----------------------------------------------------


@pytest.mark.timeout(30)
def test_a_coordinator_killed_between_batches_is_coordinator_died_not_a_broken_pipe():
    """Once the coordinator and its workers are gone, the control pipe has no reader: the consumer's next
    write to it fails with EPIPE. That must come out as the coordinator's death, with its pid and signal."""
    loader = prefetch.Loader(np.arange(400), batch_size=4, workers=2, prefetch=2)
    iterator = iter(loader)
    next(iterator)
    pids = loader_processes()
    engine = loader.engine
    assert engine is not None
    coordinator = engine.helper_pid()
    os.kill(coordinator, signal.SIGKILL)
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout_s=5.0)
    exc, waited = first_error(iterator)
    assert isinstance(exc, prefetch.CoordinatorDiedError), repr(exc)
    assert f"pid {coordinator}" in str(exc) and "SIGKILL" in str(exc)
    assert waited < DETECTED_S
    loader.close()


# --- 2. fork safety ------------------------------------------------------------------------------------

FORK_SCRIPT = """
import gc
import os
import sys

import numpy as np

import prefetch

if __name__ == "__main__":
    how = sys.argv[1]
    data = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    options = dict(batch_size=4, epochs=2, seed=5)
    expected = [batch.tolist() for batch in prefetch.Loader(data, workers=0, **options).stream()]
    loader = prefetch.Loader(data, workers=2, start_method="fork", **options)
    iterator = loader.stream()
    got = [next(iterator).tolist() for _ in range(5)]
    child = os.fork()
    if child == 0:  # user code forks mid-iteration; the child never touches the loader ...
        if how == "close":  # ... or closes it ...
            loader.close()
        elif how == "drop":  # ... or drops it and collects the garbage ...
            del iterator, loader
            gc.collect()
        sys.exit(0)  # ... and exits normally: atexit hooks and finalizers run
    _, status = os.waitpid(child, 0)
    got += [batch.tolist() for batch in iterator]
    print("child exit", os.waitstatus_to_exitcode(status), "stream intact", got == expected, flush=True)
    loader.close()
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["exit", "close", "drop"])
def test_a_forked_child_leaves_the_parents_loader_alone(tmp_path, how):
    script = tmp_path / "forks.py"
    script.write_text(textwrap.dedent(FORK_SCRIPT))
    result = subprocess.run(
        [sys.executable, str(script), how], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
    )
    assert result.stdout.strip() == "child exit 0 stream intact True", result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Error" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr


# --- 3. threads ----------------------------------------------------------------------------------------

# The tests below start threads before the loader forks its coordinator: the pre-flight check rightly
# warns about that, and these tests know.
threads_before_fork = pytest.mark.filterwarnings("ignore:.*threads running in this process:prefetch.PrefetchWarning")


def expected_stream(**options) -> list:
    with prefetch.Loader(np.arange(64), workers=0, **options) as loader:
        return [batch.tolist() for batch in loader]


@threads_before_fork
@pytest.mark.timeout(30)
def test_a_second_thread_iterating_gets_a_clear_error_and_no_batch_is_lost_or_repeated():
    options = dict(batch_size=4, epochs=1, seed=3)
    expected = expected_stream(**options)
    loader = prefetch.Loader(np.arange(64), workers=2, **options)
    first_batch_taken, second_done = threading.Event(), threading.Event()
    got: list = []
    errors: dict[str, BaseException] = {}

    def first() -> None:
        try:
            for batch in loader:
                got.append(batch.tolist())
                if len(got) == 1:
                    first_batch_taken.set()
                    second_done.wait(10)
        except BaseException as exc:
            errors["first"] = exc

    def second() -> None:
        first_batch_taken.wait(10)
        try:
            for batch in loader:
                got.append(("second", batch.tolist()))
        except BaseException as exc:
            errors["second"] = exc
        finally:
            second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert "first" not in errors, repr(errors["first"])
    assert isinstance(errors.get("second"), prefetch.ConcurrentIterationError), repr(errors)
    assert isinstance(errors["second"], prefetch.PrefetchError)
    assert "another thread" in str(errors["second"])
    assert got == expected  # every batch once, in order, all to the first thread
    loader.close()
    assert not multiprocess.active_children()  # nothing for the interpreter to join at exit


@threads_before_fork
@pytest.mark.timeout(30)
def test_a_thread_may_take_over_from_a_thread_that_has_ended():
    """Not concurrent: a generator left open by a thread that is gone is superseded, as in one thread."""
    options = dict(batch_size=4, epochs=1, seed=3)
    expected = expected_stream(**options)
    loader = prefetch.Loader(np.arange(64), workers=2, **options)
    left_open: list = []

    def take_two() -> None:
        iterator = iter(loader)
        left_open.append((iterator, next(iterator).tolist(), next(iterator).tolist()))

    thread = threading.Thread(target=take_two)
    thread.start()
    thread.join(20)
    _, *first = left_open[0]
    assert first + [batch.tolist() for batch in loader] == expected
    loader.close()


def loader_whose_batch_2_hangs(tmp_path):
    """A loader (2 workers, shuffle=False) whose batch 2 hangs in its transform, after batches 0 and 1 were
    taken; the marker file appears once a worker is stuck in it."""
    marker = tmp_path / "hanging"
    transform = FaultyTransform(Fault(9, "hang", str(marker)))  # sample 9 is in batch 2
    loader = prefetch.Loader(
        np.zeros((64, 1), np.float32), np.arange(64), batch_size=4, shuffle=False, workers=2, transform=transform
    )
    iterator = iter(loader)
    next(iterator)
    next(iterator)
    return loader, iterator, marker


@threads_before_fork
@pytest.mark.timeout(30)
def test_a_second_thread_meeting_a_next_in_progress_gets_the_same_error(tmp_path):
    loader, iterator, marker = loader_whose_batch_2_hangs(tmp_path)
    outcome: dict[str, object] = {}
    blocked = threading.Thread(target=lambda: outcome.setdefault("first", first_error(iterator)))
    blocked.start()
    wait_until(
        lambda: marker.exists() and loader.engine is not None and loader.engine.busy.locked(), timeout_s=10
    )  # inside next(), waiting
    with pytest.raises(prefetch.ConcurrentIterationError, match="another thread"):
        next(iter(loader))
    loader.close()
    blocked.join(10)
    exc, _ = outcome["first"]  # type: ignore[misc]
    assert isinstance(exc, prefetch.LoaderClosedError), repr(exc)


@threads_before_fork
@pytest.mark.timeout(30)
def test_close_from_another_thread_wakes_a_blocked_next_with_loader_closed(tmp_path):
    loader, iterator, marker = loader_whose_batch_2_hangs(tmp_path)
    pids = loader_processes()
    raised_at: dict[str, object] = {}

    def consume() -> None:
        try:
            next(iterator)
        except BaseException as exc:
            raised_at["exc"] = exc
        raised_at["time"] = time.monotonic()

    blocked = threading.Thread(target=consume)
    blocked.start()
    wait_until(
        lambda: marker.exists() and loader.engine is not None and loader.engine.busy.locked(), timeout_s=10
    )  # inside next(), waiting
    closing = time.monotonic()
    loader.close()
    closed = time.monotonic()
    blocked.join(10)
    assert isinstance(raised_at.get("exc"), prefetch.LoaderClosedError), repr(raised_at)
    assert "closed" in str(raised_at["exc"])
    assert raised_at["time"] - closing < 0.5  # type: ignore[operator]
    assert closed - closing < DETECTED_S
    # close() returned: everything is already gone, no waiting
    assert not any(alive(pid) for pid in pids) and not segments_of(os.getpid())
    assert not multiprocess.active_children()


# --- 5. a timeout meets a worker slow to die, or a batch just delivered ------------------------------------


@pytest.mark.timeout(60)
def test_a_worker_slow_to_die_after_a_timeout_is_still_a_worker_timeout_naming_the_batch(tmp_path):
    """The worker stuck in batch 2 is killed, but its death is seen late: a helper it forked keeps a copy of
    its process sentinel (as a worker stuck in an NFS read, or freeing a large memory, is slow to die). The
    coordinator answers the timeout when it kills, so the user gets ``WorkerTimeoutError`` for batch 2 on
    time -- not the coordinator blamed and killed."""
    helper_pid, release = tmp_path / "helper", tmp_path / "release"
    transform = ForksAHelperThenHangs(9, str(helper_pid), str(release))  # sample 9 is in batch 2
    loader = prefetch.Loader(
        np.zeros((64, 1), np.float32),
        np.arange(64),
        batch_size=4,
        shuffle=False,
        workers=2,
        timeout=TIMEOUT_S,
        transform=transform,
    )
    helper = None
    try:
        exc, waited = first_error(iter(loader))
        helper = int(helper_pid.read_text())
        assert alive(helper)  # it still holds the killed worker's sentinel
        closing = time.monotonic()
        loader.close()
        closed = time.monotonic() - closing
    finally:
        release.touch()
        if helper is not None:
            wait_until(lambda: not alive(helper), timeout_s=10)
        loader.close()
    assert isinstance(exc, prefetch.WorkerTimeoutError), repr(exc)
    assert exc.batch == 2 and 9 in exc.indices and f"timeout={TIMEOUT_S}" in str(exc)
    assert waited < TIMEOUT_S + 1.0, waited
    assert closed < DETECTED_S, closed  # the dead worker is reaped without waiting for its sentinel for long


@pytest.mark.timeout(60)
def test_a_timeout_racing_a_delivered_batch_blames_nobody_and_the_stream_goes_on(tmp_path):
    """The consumer's deadline for batch 1 fires just as batch 1 arrives (its worker has delivered it and
    is making batch 2): the late-batch call is made by hand at that moment. The worker is killed for batch 1,
    so batch 2 is redone without counting against it: with retries=0 the stream is complete and the same."""
    marker = tmp_path / "in-batch-2"
    options = dict(batch_size=4, shuffle=False, epochs=1, retries=0)
    data, index = np.arange(64, dtype=np.float32).reshape(64, 1), np.arange(64)
    with prefetch.Loader(data, index, workers=0, transform=FaultyTransform(None), **options) as loader:
        expected = [batch[0].tolist() for batch in loader]
    transform = FaultyTransform(Fault(9, "hang", str(marker)))  # sample 9 (batch 2) hangs, once
    with prefetch.Loader(data, index, workers=1, prefetch=3, transform=transform, **options) as loader:
        iterator = iter(loader)
        got = [next(iterator)[0].tolist()]
        wait_until(marker.exists, timeout_s=20)  # the worker made batch 1 and is stuck in batch 2
        engine = loader.engine
        assert engine is not None
        engine.run.late(1)  # what the consumer's clock does at batch 1's deadline
        got += [batch[0].tolist() for batch in iterator]
        assert loader.stats().restarts == 1
    assert got == expected
