"""prefetch.background: a plain generator run in one background process, same items, bounded, leak-free."""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import os
import random
import signal
import threading
import types
import warnings
from itertools import islice

import numpy as np
import pytest
from helpers import ALPHABET_X, ALPHABET_Y, all_gone, segments_of, wait_until

import prefetch
from prefetch.errors import RemoteTraceback
from prefetch.ipc.segments import LOCK_NAME

# Poll interval and upper bound when waiting for the producer to reach a state it must reach.
POLL_S = 0.005
DEADLINE_S = 10.0
# `prefetch.background` is the function; the module behind it:
background_module = importlib.import_module("prefetch.background")


def _segments() -> set[str]:
    """This process's loaders' segments."""
    return set(segments_of(os.getpid()))


def _data_segments() -> set[str]:
    """This process's segments that hold data (not the lock files that mark their owner alive)."""
    return {name for name in _segments() if not name.endswith(f"-{LOCK_NAME}")}


def seed_data_generator(batch_size, data_x, data_y, shuffle=True):
    """The seed's generator, verbatim."""
    data_size = len(data_x)
    index_list = [*range(data_size)]
    if shuffle:
        random.shuffle(index_list)
    index = 0
    while True:
        batch_x, batch_y = [], []
        for _ in range(batch_size):
            if index >= data_size:
                index = 0
                if shuffle:
                    random.shuffle(index_list)
            batch_x.append(data_x[index_list[index]])
            batch_y.append(data_y[index_list[index]])
            index += 1
        yield (batch_x, batch_y)


def array_generator(n_items, shape=(16, 32, 32, 3)):
    """A seed-like generator of (images, labels) arrays, randomness from np.random."""
    for i in range(n_items):
        yield np.random.randint(0, 255, shape, dtype=np.uint8), np.full(shape[0], i, dtype=np.int64)


def take(gen, n):
    items = list(islice(gen, n))
    gen.close()
    return items


def test_the_seed_generator_gives_identical_items():
    random.seed(1234)
    expected = take(seed_data_generator(3, ALPHABET_X, ALPHABET_Y), 60)
    random.seed(1234)
    gen = prefetch.background(seed_data_generator(3, ALPHABET_X, ALPHABET_Y))
    assert isinstance(gen, types.GeneratorType)
    assert take(gen, 60) == expected
    assert expected[0] != expected[9]  # shuffled, epochs straddled: a real comparison


def test_arrays_travel_through_shared_memory_and_stay_unchanged():
    np.random.seed(5)
    expected = list(array_generator(12))
    np.random.seed(5)
    gen = prefetch.background(array_generator(12), depth=3)
    first = next(gen)
    assert _data_segments(), "array items should be written to shared-memory segments"
    held = [first, *gen]  # exhausted: the process is gone and the segments unlinked
    assert not _segments()
    assert len(held) == 12
    for (x, y), (ex, ey) in zip(held, expected):
        assert x.dtype == np.uint8 and x.shape == ex.shape and np.array_equal(x, ex)
        assert np.array_equal(y, ey)
    first[0][...] = 0  # the user's own copy: writable, and changes nothing else
    assert np.array_equal(held[1][0], expected[1][0])


def test_large_python_objects_and_empty_iterables():
    big = [f"sample-{i}" for i in range(20_000)]  # a pickle far above the inline limit
    items = list(prefetch.background([big, {"x": np.arange(3)}, None]))
    assert items[0] == big and items[1]["x"].tolist() == [0, 1, 2] and items[2] is None
    assert list(prefetch.background(iter([]))) == []


def _produced(path) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def counting_generator(path):
    """Endless; appends one byte to ``path`` per item made (the producer's progress, visible here)."""
    i = 0
    while True:
        with open(path, "ab") as file:
            file.write(b"x")
        yield np.full(4, i)
        i += 1


@pytest.mark.parametrize("depth", [1, 3])
def test_backpressure_keeps_at_most_depth_items_ahead(tmp_path, depth):
    path = tmp_path / "made"
    gen = prefetch.background(counting_generator(path), depth=depth)
    for consumed in range(1, 8):
        assert next(gen)[0] == consumed - 1
        assert _produced(path) <= consumed + depth
    wait_until(lambda: _produced(path) >= 7 + depth, DEADLINE_S, POLL_S)
    assert _produced(path) == 7 + depth  # it does work ahead, up to the bound
    gen.close()
    assert _produced(path) == 7 + depth


def failing_generator():
    yield 1
    yield np.arange(3)
    raise ValueError("boom at item 2")


def test_an_exception_in_the_generator_is_raised_with_its_type():
    gen = prefetch.background(failing_generator())
    assert next(gen) == 1
    assert next(gen).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="boom at item 2") as info:
        next(gen)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "failing_generator" in info.value.__cause__.text
    assert any("background iterable" in note for note in info.value.__notes__)
    with pytest.raises(StopIteration):
        next(gen)


def suicidal_generator():
    yield np.zeros(3)
    os.kill(os.getpid(), signal.SIGKILL)
    yield np.ones(3)  # pragma: no cover - never reached


def test_a_killed_producer_is_reported_not_a_hang():
    gen = prefetch.background(suicidal_generator())
    next(gen)
    with pytest.raises(prefetch.WorkerDiedError, match="SIGKILL"):
        next(gen)


def test_closing_or_dropping_early_leaves_nothing():
    gen = prefetch.background(array_generator(1000), depth=2)
    next(gen)
    assert _data_segments()
    gen.close()
    assert not _segments()

    gen = prefetch.background(array_generator(1000))
    next(gen)
    del gen
    gc.collect()
    assert not _segments()
    # the no_leaks fixture checks that no process is left either


KILLED_CONSUMER = """
import os, sys, time
import numpy as np
import prefetch

def items():
    while True:
        yield os.getpid(), np.zeros((64, 64))

gen = prefetch.background(items(), depth=2)
producer_pid, _ = next(gen)
print(os.getpid(), producer_pid, flush=True)
time.sleep(60)
"""


def test_a_killed_consumer_leaves_no_producer_and_no_segment():
    import subprocess
    import sys

    from prefetch.ipc.segments import NAME_ROOT, SHM_DIR

    consumer = subprocess.Popen([sys.executable, "-c", KILLED_CONSUMER], stdout=subprocess.PIPE, text=True)
    try:
        consumer_pid, producer_pid = map(int, consumer.stdout.readline().split())
        prefix = f"{NAME_ROOT}{consumer_pid}-"
        assert any(name.startswith(prefix) for name in os.listdir(SHM_DIR))
    finally:
        consumer.kill()
        consumer.wait()
        consumer.stdout.close()

    wait_until(all_gone([producer_pid], consumer_pid), DEADLINE_S, POLL_S)  # the producer did not outlive it


def test_a_never_started_generator_starts_no_process():
    gen = prefetch.background(array_generator(5))
    del gen  # nothing ran: nothing to clean up (the no_leaks fixture checks)


def make_seeded_generator():
    random.seed(99)
    return seed_data_generator(4, ALPHABET_X, ALPHABET_Y)


def test_without_fork_a_generator_object_is_refused_and_a_function_works(monkeypatch):
    monkeypatch.setattr(background_module, "_fork_available", lambda: False)
    with pytest.raises(RuntimeError, match="zero-argument function that returns the iterable"):
        prefetch.background(seed_data_generator(3, ALPHABET_X, ALPHABET_Y))
    expected = take(make_seeded_generator(), 20)
    assert take(prefetch.background(make_seeded_generator), 20) == expected  # spawned, pickled with dill


def test_a_function_returning_the_iterable_works_with_fork():
    assert list(prefetch.background(lambda: (i * i for i in range(5)))) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("depth", [0, -1, 1.5, True])
def test_bad_depth_says_what_to_change(depth):
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        prefetch.background([1, 2], depth=depth)


def test_a_non_iterable_is_refused():
    with pytest.raises(TypeError, match="an iterable"):
        prefetch.background(42)


def test_without_fork_the_refusal_is_a_typed_prefetch_error(monkeypatch):
    monkeypatch.setattr(background_module, "_fork_available", lambda: False)
    with pytest.raises(prefetch.ForkUnavailableError) as info:
        prefetch.background(iter([1, 2]))
    assert isinstance(info.value, prefetch.PrefetchError) and isinstance(info.value, RuntimeError)


def long_failing_generator():
    yield 0
    raise ValueError("x" * 20_000)  # far above one atomic pipe write: the message is spilled to a file


def test_a_failure_too_large_for_one_pipe_write_arrives_whole():
    gen = prefetch.background(long_failing_generator())
    assert next(gen) == 0
    with pytest.raises(ValueError) as info:
        next(gen)
    assert str(info.value) == "x" * 20_000
    assert not _segments()  # the spill file was read and unlinked, the rest at the end


def test_a_deep_window_of_tiny_items_keeps_order_and_never_stalls():
    """Thousands of credits in flight: the consumer's answers never wait for the producer to read."""
    assert list(prefetch.background(range(20_000), depth=5_000)) == list(range(20_000))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_generator_drawing_from_torch_gives_the_inline_items(monkeypatch, start):
    """The producer continues from the consumer's torch state (a forked one inherits it, a spawned one
    is given it), and the consumer's own torch state does not advance meanwhile."""
    torch = pytest.importorskip("torch")
    from torchhelpers import make_torch_items, torch_items

    torch.manual_seed(3)
    expected = [item.tolist() for item in torch_items(12)]
    torch.manual_seed(3)
    seeded = torch.get_rng_state()
    if start == "spawn":
        monkeypatch.setattr(background_module, "_fork_available", lambda: False)
        gen = prefetch.background(make_torch_items)  # pickled with dill: unpickling imports torch there
    else:
        gen = prefetch.background(torch_items(12))
    assert [item.tolist() for item in gen] == expected
    assert torch.equal(torch.get_rng_state(), seeded)


# --- what the iterable raises --------------------------------------------------------------------------------


class Halt(BaseException):
    """A user's own control-flow exception: a BaseException, like KeyboardInterrupt, not an Exception."""


def halting_generator(exc: BaseException):
    yield 1
    raise exc


@pytest.mark.parametrize("exc", [Halt("stop at item 1"), KeyboardInterrupt("raised by the iterable itself")])
def test_a_base_exception_from_the_iterable_keeps_its_type(exc):
    gen = prefetch.background(halting_generator(exc))
    assert next(gen) == 1
    with pytest.raises(type(exc), match=str(exc)) as info:
        next(gen)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "halting_generator" in info.value.__cause__.text
    with pytest.raises(StopIteration):
        next(gen)


def test_sys_exit_in_the_iterable_ends_the_producer_like_a_worker():
    gen = prefetch.background(halting_generator(SystemExit(3)))
    assert next(gen) == 1
    with pytest.raises(prefetch.WorkerDiedError, match=r"exited with code 3: .*sys\.exit\(\)"):
        next(gen)


# --- start_method: a producer that does not fork this process ------------------------------------------------

# Module state the consumer changes at run time: a forked producer sees the change, a spawned one (which
# imports this module afresh) does not.
SEEN_BY_THE_PRODUCER = {"value": "as imported"}


def what_the_producer_sees():
    yield SEEN_BY_THE_PRODUCER["value"]


@pytest.mark.parametrize(("start_method", "seen"), [(None, "changed"), ("fork", "changed"), ("spawn", "as imported")])
def test_start_method_says_how_the_producer_starts(monkeypatch, start_method, seen):
    monkeypatch.setitem(SEEN_BY_THE_PRODUCER, "value", "changed")
    assert list(prefetch.background(what_the_producer_sees, start_method=start_method)) == [seen]


def test_a_generator_object_needs_fork():
    with pytest.raises(TypeError, match="zero-argument function that returns the iterable"):
        prefetch.background(what_the_producer_sees(), start_method="spawn")


def test_a_picklable_iterable_may_be_spawned():
    assert list(prefetch.background([np.arange(3), "b"], start_method="spawn"))[1] == "b"


@pytest.mark.parametrize("start_method", ["forkserver", "thread", "", 1])
def test_an_unknown_start_method_says_what_to_pass(start_method):
    with pytest.raises(ValueError, match="start_method must be 'fork', 'spawn' or None"):
        prefetch.background(what_the_producer_sees, start_method=start_method)


ITERABLE_LOCK = threading.Lock()  # a lock the iterable needs, as a library's internal lock would be


def needs_the_lock(path: str):
    with open(path, "w") as file:
        file.write(str(os.getpid()))  # about to take the lock
    with ITERABLE_LOCK:
        yield "took the lock"


@contextlib.contextmanager
def lock_held_by_another_thread():
    """ITERABLE_LOCK held by a thread named 'lock-holder' for the duration."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with ITERABLE_LOCK:
            held.set()
            release.wait()

    holder = threading.Thread(target=hold, name="lock-holder")
    holder.start()
    held.wait()
    try:
        yield
    finally:
        release.set()
        holder.join()


@pytest.mark.timeout(30)
def test_a_lock_held_at_the_fork_is_warned_about_and_hangs_a_forked_producer(tmp_path):
    """Fork copies the lock as it is -- held -- and not the thread that would release it: the producer waits
    forever. The warning names the thread and the remedy; the test then kills the hung producer."""
    marker = tmp_path / "producer"
    outcome: list[BaseException] = []
    gen = prefetch.background(needs_the_lock(str(marker)))

    def take() -> None:
        try:
            next(gen)
        except BaseException as exc:
            outcome.append(exc)

    with lock_held_by_another_thread(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        reader = threading.Thread(target=take)
        reader.start()
        wait_until(lambda: marker.exists() and marker.read_text(), DEADLINE_S, POLL_S)
    # The consumer's lock is free now; the producer's copy never will be: it is blocked, not slow.
    producer = int(marker.read_text())
    reader.join(timeout=1.0)
    assert reader.is_alive() and not outcome
    messages = [str(w.message) for w in record if issubclass(w.category, prefetch.PrefetchWarning)]
    assert any("'lock-holder'" in m and 'start_method="spawn"' in m for m in messages), messages
    os.kill(producer, signal.SIGKILL)
    reader.join(timeout=DEADLINE_S)
    assert len(outcome) == 1 and isinstance(outcome[0], prefetch.WorkerDiedError)
    gen.close()


@pytest.mark.timeout(60)
def test_a_lock_held_by_another_thread_does_not_hang_a_spawned_producer(tmp_path):
    make_items = functools.partial(needs_the_lock, str(tmp_path / "producer"))
    with lock_held_by_another_thread(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        items = list(prefetch.background(make_items, start_method="spawn"))
    assert items == ["took the lock"]
    assert not [w for w in record if issubclass(w.category, prefetch.PrefetchWarning)]  # nothing is forked


# --- who dies with whom --------------------------------------------------------------------------------------


def test_a_producer_outlives_the_thread_that_started_it():
    """Linux's parent-death signal fires when the *thread* that forked a process ends: the producer must
    live as long as the consumer process, whichever thread started it."""
    gen = prefetch.background(np.full(4, i) for i in range(8))
    got = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", prefetch.PrefetchWarning)  # the main thread runs while it forks
        starter = threading.Thread(target=lambda: got.append(next(gen)))
        starter.start()
        starter.join()
    got.extend(gen)
    assert [int(item[0]) for item in got] == list(range(8))
