"""hedge=True inside a worker: the rule (``core.hedging.ReadHedging``, times given, no clock of its own) and a
batch's reads with a late one started a second time (``core.readahead.Loads`` given the rule, threads in this
process). The stragglers block on events, never on time: a first read waits until the second has started."""

from __future__ import annotations

import threading
import time

import pytest

from prefetch.core import hedging, readahead, threaded
from prefetch.core.hedging import (
    READ_MARGIN_FACTOR,
    READ_MIN_MARGIN_S,
    READ_MIN_MEASURED,
    READ_MIN_S,
    READ_SHARE,
    ReadHedging,
)

WAIT_S = 30.0  # an event not set by then is a failure (the test's timeout ends it first)


@pytest.fixture(autouse=True)
def pools_ended():
    """The reads' threads end with each test: none is left running when a later test forks."""
    yield
    threaded.end_pools()


def measured(seconds: float, reads: int = READ_MIN_MEASURED) -> ReadHedging:
    rule = ReadHedging()
    for _ in range(reads):
        rule.measured(seconds)
    return rule


# --- the rule -------------------------------------------------------------------------------------------


def test_no_hedge_before_enough_reads_are_measured_but_the_reads_are_timed_one_by_one():
    rule = measured(0.01, READ_MIN_MEASURED - 1)
    assert rule.margin() is None and rule.deadline(5.0) is None
    assert rule.active()  # unmeasured: read through the threads, which time every read
    rule.measured(0.01)
    assert rule.deadline(5.0) == pytest.approx(5.0 + READ_MARGIN_FACTOR * 0.01)


def test_the_margin_is_the_median_read_times_the_factor_ignoring_stragglers_with_a_floor():
    times = [0.002 + 0.0001 * (k % 7) for k in range(READ_MIN_MEASURED)] + [0.5, 0.7, 0.9]
    rule = ReadHedging()
    for seconds in times:
        rule.measured(seconds)
    assert rule.margin() == pytest.approx(READ_MARGIN_FACTOR * sorted(times)[len(times) // 2])
    fast = measured(READ_MIN_MARGIN_S / READ_MARGIN_FACTOR / 10)
    assert fast.margin() == READ_MIN_MARGIN_S


def test_the_cap_bounds_the_extra_reads_to_one_plus_a_share_of_the_reads():
    rule = measured(0.01, 1000)
    allowed = int(1 + READ_SHARE * 1000 - 1e-9) + 1  # hedges < 1 + share * reads
    assert sum(rule.take() for _ in range(allowed + 10)) == allowed
    assert rule.deadline(0.0) is None  # nothing more is hedged...
    for _ in range(round(1 / READ_SHARE)):
        rule.measured(0.01)
    assert rule.deadline(0.0) is not None and rule.take()  # ...until more reads are made


def test_fast_reads_are_not_hedged_and_slow_ones_again_are():
    """Read without hedging, a batch is timed as a whole (``measured_batch``), its mean per read; read through
    the threads, each read is timed (``measured``)."""
    rule = measured(READ_MIN_S / 10)
    assert not rule.active()
    for _ in range(100):
        rule.measured_batch(READ_MIN_S * 32 / 2, reads=32, threads=1)  # still fast: nothing moves
    assert not rule.active() and rule.reads == READ_MIN_MEASURED + 100 * 32
    for _ in range(9):  # batches of reads twice the floor, one at a time: they fill the window
        rule.measured_batch(READ_MIN_S * 32 * 2, reads=32, threads=1)
    assert rule.active()
    for _ in range(hedging.READ_WINDOW):  # then read one by one in threads, fast again
        rule.measured(READ_MIN_S / 2)
    assert not rule.active()
    threaded_reads = ReadHedging()
    threaded_reads.measured_batch(READ_MIN_S * 32 / 8 * 2, reads=32, threads=8)  # 8 at a time: each took 8x its share
    assert threaded_reads.active()


# --- a batch's reads ------------------------------------------------------------------------------------


class Gated:
    """Sample ``i`` is ``10 * i``. Reads are counted per index. The first read of each index in ``slow``
    waits until a second read of it has started (then until ``release``, if given), and then does what
    ``first`` says; a second read does what ``second`` says ("return" or "raise")."""

    def __init__(self, slow: tuple[int, ...], first: str = "return", second: str = "return", release=None):
        self.slow, self.first, self.second, self.release = slow, first, second, release
        self.lock = threading.Lock()
        self.reads: dict[int, int] = {}
        self.second_started = {i: threading.Event() for i in slow}
        self.first_done = threading.Event()

    def __call__(self, i: int) -> int:
        with self.lock:
            count = self.reads[i] = self.reads.get(i, 0) + 1
        time.sleep(0.0005)  # every read takes a little, as a read does
        if i in self.slow and count == 1:
            try:
                assert self.second_started[i].wait(WAIT_S), f"sample {i}'s read was never started again"
                if self.release is not None:
                    assert self.release.wait(WAIT_S)
                if self.first == "raise":
                    raise ValueError(f"first read of {i}")
                return 10 * i
            finally:
                self.first_done.set()
        if i in self.slow and count == 2:
            self.second_started[i].set()
            if self.second == "raise":
                raise KeyError(f"second read of {i}")
        return 10 * i


def read(source, n: int, threads: int = 1, rule: ReadHedging | None = None) -> tuple[list, ReadHedging]:
    rule = rule or measured(0.0005)
    return readahead.Loads(source, list(range(n)), threads, rule).result(), rule


@pytest.mark.timeout(60)
@pytest.mark.parametrize("threads", [1, 3])
def test_a_late_read_is_read_again_and_the_copy_that_comes_first_is_taken(threads):
    """The first read of 5 is let go only after run() returned: the batch came from the second read."""
    release = threading.Event()
    source = Gated(slow=(5,), release=release)
    values, rule = read(source, 20, threads)
    assert values == [10 * i for i in range(20)]
    assert not source.first_done.is_set()  # the first read is still blocked: the copy taken was the hedge's
    assert source.reads[5] == 2 and rule.hedges >= 1
    release.set()
    assert source.first_done.wait(WAIT_S)


@pytest.mark.timeout(60)
def test_a_hedge_that_raises_is_dropped_and_the_first_read_counts():
    source = Gated(slow=(5,), second="raise")
    values, _ = read(source, 12)
    assert values == [10 * i for i in range(12)]
    assert source.reads[5] == 2


@pytest.mark.timeout(60)
def test_a_first_read_that_raises_after_its_hedge_succeeded_is_dropped():
    release = threading.Event()
    source = Gated(slow=(5,), first="raise", release=release)
    values, _ = read(source, 12)
    assert values == [10 * i for i in range(12)]
    release.set()
    assert source.first_done.wait(WAIT_S)


class Raises:
    """``source[i]`` raises for the indices in ``bad``, every time; a read of ``held`` waits until ``go`` is set,
    and a bad one (given ``held``) raises only once the read of ``held`` has started."""

    def __init__(self, bad: tuple[int, ...], held: int = -1):
        self.bad, self.held = bad, held
        self.go = threading.Event()
        self.held_started = threading.Event()
        self.held_done = threading.Event()

    def __call__(self, i: int) -> int:
        if i == self.held:
            self.held_started.set()
            try:
                assert self.go.wait(WAIT_S)
            finally:
                self.held_done.set()
        if i in self.bad:
            assert self.held < 0 or self.held_started.wait(WAIT_S)
            raise ValueError(f"bad sample {i}")
        return i


@pytest.mark.timeout(60)
def test_the_first_error_in_the_batch_order_is_raised_as_itself():
    loads = readahead.Loads(Raises((3, 7)), list(range(10)), 2, measured(0.0005))
    with pytest.raises(ValueError, match="bad sample 3"):
        loads.result()
    assert loads.failed_index == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rule", [ReadHedging, None], ids=["hedged", "not hedged"])
def test_an_error_is_raised_once_the_reads_before_it_are_in_without_waiting_for_the_rest(rule):
    """Sample 4's read never ends while the batch is read: the error of 2 comes out all the same. (A rule with
    too few reads measured: nothing is hedged, the caller sleeps until a read wakes it; or no rule, hedge=False.)"""
    source = Raises((2,), held=4)
    loads = readahead.Loads(source, list(range(6)), 3, rule() if rule else None)  # 2 fails while 4 is read
    try:
        with pytest.raises(ValueError, match="bad sample 2"):
            loads.result()
        assert not source.held_done.is_set()  # raised while 4 was still read
    finally:
        source.go.set()
    assert loads.failed_index == 2


def test_the_rule_is_one_per_loader_and_process_and_goes_with_its_loader():
    class Owner:
        pass

    first, second = Owner(), Owner()
    assert readahead.rule_for(first) is readahead.rule_for(first)
    assert readahead.rule_for(first) is not readahead.rule_for(second)
    key = id(first)
    del first
    assert key not in readahead._rules


def test_the_constants_keep_their_meaning():
    assert hedging.READ_MIN_MARGIN_S > hedging.READ_MIN_S  # a read below the floor is never late on jitter alone
