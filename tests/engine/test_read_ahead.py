"""io_threads' read-ahead: a worker starts its next task's loads while it finishes the current batch; the
stream is the same for any io_threads, a failing read ahead fails its own batch, and the generators are
still watched (docs/design.md, "io_threads")."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import threading

import numpy as np
import pytest
from helpers import fingerprint
from test_io_threads import Records, draw_all, stream_sha

import prefetch
from prefetch.core import readahead, rng, threaded
from prefetch.core.pipeline import UserCodeRaised, make_numbered_batch

BATCH = 4
BATCHES = 6
WAIT_S = 10.0  # the most a transform waits for the next batch's read: only reached when there is no read-ahead
TRIES = 2  # transforms per process that wait (a worker may not yet hold its next task at its first batches)


@pytest.mark.timeout(120)
def test_the_stream_is_the_same_for_any_io_threads_with_read_ahead():
    """Workers read ahead (io_threads > 1): the stream's SHA-256 is workers=0's for k = 1, 8, 32."""
    shas = {(k, w): stream_sha(k, w) for k in (1, 8, 32) for w in (0, 2)}
    assert len(set(shas.values())) == 1, shas


@pytest.fixture
def as_a_worker():
    """Make batches in this process as a worker does (``rng.seed_globals``, read-ahead), then give the
    process its generators back and end the read-ahead and the pools."""
    with rng.seeded_in_caller(0, 0):  # restores the generators (and batch_rng's state) after
        yield
        readahead.cancel_ahead()
        threaded.end_pools()


def _stream_reading_ahead(io_threads: int) -> str:
    """The stream as a worker makes it, in this process: every batch with the next one's loads started."""
    options = {"batch_size": 8, "epochs": 2, "seed": 7, "transform": draw_all, "io_threads": io_threads}
    config = prefetch.Loader(Records(), **options).config
    order = config.order
    digest = hashlib.sha256()
    for batch in range(order.num_batches):
        upcoming = batch + 1
        ahead = (upcoming, order.batch_indices(upcoming)) if upcoming < order.num_batches else None
        made, _ = make_numbered_batch(config, batch, order.batch_indices(batch), ahead=ahead)
        digest.update(pickle.dumps(fingerprint(made)))
    return digest.hexdigest()


@pytest.mark.timeout(60)
def test_every_batch_read_ahead_makes_the_workers_0_stream(as_a_worker):
    """Read-ahead at every batch (not left to when a worker holds its next task): the same SHA-256."""
    shas = {k: _stream_reading_ahead(k) for k in (1, 8, 32)}
    assert set(shas.values()) == {stream_sha(1, 0)}, shas


# --- the next batch's reads overlap the current batch's transform -----------------------------------------
# Per process (a worker's own): an event per batch, set when a read of its first sample starts; whether the
# transform of that batch's predecessor released it (``_released``); how many transforms waited.
_lock = threading.Lock()
_started: dict[tuple[int, int], threading.Event] = {}
_released: dict[tuple[int, int], threading.Event] = {}
_armed: dict[int, int] = {}  # pid -> the batch whose first read fails (``Signals(fail=True)``)
_waits: dict[int, list[bool]] = {}


def _event(events: dict[tuple[int, int], threading.Event], batch: int) -> threading.Event:
    with _lock:
        return events.setdefault((os.getpid(), batch), threading.Event())


class Signals:
    """``BATCH * BATCHES`` samples (``shuffle=False``: sample ``i`` is in batch ``i // BATCH``). The read of a
    batch's first sample (batch >= 2) says it started, then waits until the transform of the batch before
    has seen it (or given up): with ``fail``, the first such read that the previous transform saw raises."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def __len__(self) -> int:
        return BATCH * BATCHES

    def __getitem__(self, i: int) -> np.ndarray:
        batch = i // BATCH
        if i % BATCH == 0 and batch >= 2:
            _event(_started, batch).set()
            assert _event(_released, batch).wait(2 * WAIT_S)
            if self.fail and _armed.get(os.getpid()) == batch:
                raise KeyError(i)
        return np.array([i, 0])


def wait_for_next_read(sample: np.ndarray) -> np.ndarray:
    """The transform: at the last sample of batch b (1 <= b < BATCHES - 1), wait for the first read of
    batch b + 1 in this process; the sample says whether it came (column 1)."""
    i = int(sample[0])
    batch, upcoming = i // BATCH, i // BATCH + 1
    if i % BATCH != BATCH - 1 or not 1 <= batch < BATCHES - 1:
        return sample
    waits = _waits.setdefault(os.getpid(), [])
    seen = False
    if len(waits) < TRIES and not any(waits):
        seen = _event(_started, upcoming).wait(WAIT_S)
        waits.append(seen)
        if seen:
            _armed.setdefault(os.getpid(), upcoming)
    _event(_released, upcoming).set()
    return np.array([i, int(seen)])


def _loader(fail: bool) -> prefetch.Loader:
    # one worker: its next task is the next batch
    options = {"batch_size": BATCH, "shuffle": False, "epochs": 1, "workers": 1, "io_threads": 4}
    return prefetch.Loader(Signals(fail), transform=wait_for_next_read, **options)


@pytest.mark.timeout(60)
def test_the_next_batch_is_read_while_the_current_one_is_transformed():
    with _loader(fail=False) as loader:
        batches = [batch.copy() for batch in loader]
    stream = np.concatenate(batches)
    assert stream[:, 0].tolist() == list(range(BATCH * BATCHES))
    assert stream[:, 1].sum() == 1  # one transform saw its next batch's read begin (and then no other waited)


@pytest.mark.timeout(60)
def test_a_failing_read_ahead_fails_its_own_batch():
    """The read of batch b + 1 fails while batch b is transformed: b is delivered, b + 1 raises for its sample."""
    delivered = []
    with _loader(fail=True) as loader, pytest.raises(KeyError) as raised:
        for batch in loader:
            delivered.append(batch.copy())
    last = delivered[-1]
    assert last[-1, 1] == 1  # the failing read happened while the last delivered batch was transformed
    (index,) = raised.value.args
    assert index == last[-1, 0] + 1  # the first sample of the batch right after it
    assert len(delivered) == index // BATCH


# --- the generators are watched between batches ---------------------------------------------------------
class DrawsWhenReleased:
    """Reads of batch 1 wait until ``release`` is set, then draw from ``random``; ``drawn`` counts them."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.drawn = threading.Semaphore(0)

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> np.ndarray:
        if i // 4 == 1:
            assert self.release.wait(WAIT_S)
            random.random()
            self.drawn.release()
        return np.full(2, i)


@pytest.mark.timeout(30)
def test_a_draw_by_a_read_ahead_between_batches_fails_the_next_batch(as_a_worker):
    """A read ahead that draws after the current batch is made, before the next is seeded: the next batch
    fails, naming the generator (the window a worker spends writing a batch and taking its next task)."""
    source = DrawsWhenReleased()
    config = prefetch.Loader(source, batch_size=4, shuffle=False, io_threads=4).config
    order = config.order
    try:
        make_numbered_batch(config, 0, order.batch_indices(0), ahead=(1, order.batch_indices(1)))
        source.release.set()
        for _ in range(4):
            assert source.drawn.acquire(timeout=WAIT_S)
        with pytest.raises(UserCodeRaised, match=r"drew from random while io_threads > 1"):
            make_numbered_batch(config, 1, order.batch_indices(1))
    finally:
        source.release.set()
