"""The truth about sharing the cores: ``stats()`` says when the loop and the workers compete for them, and
that a loop with no training step waits by design.

Two halves, each exact whatever else the machine runs. The figures: a loop that burns a fixed amount of CPU
per batch, on one core with two CPU-bound workers, must be reported as at least the CPU seconds it burned
(counted, not timed). The verdict: ``contention`` and the ``note`` row, from figures the test sets on either
side of each threshold. (Whether other processes left the loop and the workers enough of the core to fill it
is the machine's business, so the real run is not asked for the verdict.)"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import replace

import numpy as np
import pytest
from helpers import burn_cpu, cpu_heavy, one_core

import prefetch
from prefetch._tuning import CONTENTION_SHARE, IDLE_CONSUMER_CORES, WAITING_SHARE, WORKERS_BUSY_CORES
from prefetch.stats import Stats

DATA = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
BATCH = 8  # 8 samples of 2 ms of CPU: 16 ms of a worker's CPU per batch
STEP_CPU_S = 0.015  # the training step: as much CPU per batch as making the batch takes


def test_a_cpu_bound_loop_and_cpu_bound_workers_on_one_core_are_counted_in_full():
    batches = 20
    with one_core(), prefetch.Loader(DATA, batch_size=BATCH, seed=0, workers=2, transform=cpu_heavy) as loader:
        started = time.perf_counter()
        for _ in _first(loader, batches):
            burn_cpu(STEP_CPU_S)
        wall = time.perf_counter() - started
        stats = loader.stats()  # after the loop: the figures as the iteration stopped
        text = str(stats)
    assert stats.cores == 1 and stats.batches == batches
    assert stats.elapsed_s == pytest.approx(wall, rel=0.2, abs=0.2)
    # CPU seconds, whatever else runs on the machine: the loop burned 20 x 15 ms, the workers 160 x 2 ms
    assert stats.consumer_cpu * stats.elapsed_s >= batches * STEP_CPU_S * 0.9
    assert stats.workers_cpu * stats.elapsed_s >= batches * BATCH * 0.002 * 0.9
    assert re.search(r"^cpu\s+loop [0-9.]+ cores \(\d+ threads\), workers [0-9.]+ cores, of 1 usable$", text, re.M)
    assert not stats.idle_loop and "not a stall" not in text  # the loop worked between batches
    # the verdict is the rule's on these figures, and the table says it when there is one
    assert (stats.contention is not None) == any(line.startswith("note") for line in text.splitlines())


# figures on either side of each threshold: (consumer_cpu, workers_cpu, wait_fraction) on `cores` cores
MARGIN = 0.02
COMPETING = {
    "one core, filled": (1, 0.5, 0.5, 0.3),
    "one core, just enough": (1, CONTENTION_SHARE - 0.1, 0.1 + MARGIN, WAITING_SHARE - MARGIN),
    "two cores, filled": (2, 1.2, 0.8, 0.1),
}
NOT_COMPETING = {
    "the core not filled": (1, CONTENTION_SHARE - 0.1, 0.1 - MARGIN, 0.3),
    "the loop waits for data": (1, 0.5, 0.5, WAITING_SHARE),
    "the workers do nothing": (1, 1.0, WORKERS_BUSY_CORES - 0.01, 0.0),
    "two cores, one filled": (2, 0.5, 0.5, 0.1),
}


@pytest.mark.parametrize("case", list(COMPETING))
def test_a_step_and_workers_that_fill_the_cores_are_told_they_compete(case):
    cores, consumer_cpu, workers_cpu, wait = COMPETING[case]
    stats = _snapshot(cores=cores, consumer_cpu=consumer_cpu, workers_cpu=workers_cpu, wait_fraction=wait, batches=9)
    note = stats.contention
    assert note is not None and not stats.idle_loop
    assert note.startswith(f"the training step and the workers compete for {cores} core{'s' if cores > 1 else ''}:")
    assert f"used {consumer_cpu:.2f} cores" in note and f"the workers {workers_cpu:.2f}" in note
    assert "torch.set_num_threads" in note and "worker_nice" in note  # what to change
    note_row = next(line for line in str(stats).splitlines() if line.startswith("note"))
    assert f"compete for {cores} core" in note_row


@pytest.mark.parametrize("case", list(NOT_COMPETING))
def test_a_step_and_workers_that_leave_room_are_not_told_they_compete(case):
    cores, consumer_cpu, workers_cpu, wait = NOT_COMPETING[case]
    stats = _snapshot(cores=cores, consumer_cpu=consumer_cpu, workers_cpu=workers_cpu, wait_fraction=wait, batches=9)
    assert stats.contention is None and not stats.idle_loop
    assert "compete" not in str(stats) and not [line for line in str(stats).splitlines() if line.startswith("note")]


def test_a_loop_without_work_that_waits_is_told_it_is_no_stall_whatever_the_cores_do():
    idle = _snapshot(cores=1, consumer_cpu=IDLE_CONSUMER_CORES - MARGIN, workers_cpu=0.98, wait_fraction=WAITING_SHARE)
    assert idle.idle_loop and idle.contention is not None
    assert idle.contention.startswith("the loop does no work between batches")
    busy = replace(idle, consumer_cpu=IDLE_CONSUMER_CORES + MARGIN)  # a loop that works is no idle loop
    assert not busy.idle_loop and busy.contention is None  # and, waiting, it does not compete either


def test_a_loop_that_does_nothing_between_batches_waits_by_design_not_a_stall():
    # worker_nice=0: with no step to step back for, and so that other processes on a busy machine do not starve
    # the workers of the CPU they need (0.26 s in all)
    loader = prefetch.Loader(DATA, batch_size=BATCH, seed=0, workers=2, transform=cpu_heavy, epochs=2, worker_nice=0)
    with warnings.catch_warnings(record=True) as caught, loader:
        for _ in loader.stream():
            pass  # no training step
        stats = loader.stats()
        text = str(stats)
    assert stats.wait_fraction >= 0.8, stats.to_dict()  # the loop waited nearly all the time...
    assert stats.idle_loop  # ... and did no work, so it is no stall
    assert stats.contention is not None and stats.contention.startswith("the loop does no work between batches")
    assert "not a stall" in stats.contention
    waiting_row = next(line for line in text.splitlines() if line.startswith("waiting for data"))
    assert "no training step in the loop: not a stall" in waiting_row
    assert "workers compete for" not in text
    said = [str(w.message) for w in caught if issubclass(w.category, prefetch.PrefetchWarning)]
    assert not [message for message in said if "workers compete for" in message]


def _first(loader: prefetch.Loader, n: int):
    """The first ``n`` batches of ``loader.stream()``, then the stream is closed (its processes stop)."""
    batches = loader.stream()
    try:
        for _ in range(n):
            yield next(batches)
    finally:
        batches.close()


# --- the figures behind it ----------------------------------------------------------------------------


def _snapshot(**figures) -> Stats:
    base = dict(
        batches=0,
        samples=0,
        elapsed_s=0.0,
        batches_per_s=0.0,
        samples_per_s=0.0,
        wait_fraction=0.0,
        worker_busy={},
        load_s=0.0,
        transform_s=0.0,
        collate_s=0.0,
        transfer_s=0.0,
        mean_fill=0.0,
        max_fill=0,
        restarts=0,
        cores=2,
        started_at=100.0,
    )
    return Stats(**{**base, **figures})


def test_since_gives_the_figures_of_the_window_between_two_snapshots():
    earlier = _snapshot(
        batches=10, samples=80, elapsed_s=2.0, wait_fraction=0.5, worker_busy={7: 0.5}, load_s=0.01, mean_fill=1.0,
        consumer_cpu=0.5, workers_cpu=1.0,
    )  # fmt: skip
    later = _snapshot(
        batches=30, samples=240, elapsed_s=6.0, wait_fraction=0.25, worker_busy={7: 0.5, 8: 0.25}, load_s=0.02,
        mean_fill=2.0, consumer_cpu=1.0, workers_cpu=1.0, max_fill=5,
    )  # fmt: skip
    window = later.since(earlier)
    assert window.batches == 20 and window.samples == 160 and window.elapsed_s == pytest.approx(4.0)
    assert window.samples_per_s == pytest.approx(40.0)
    assert window.wait_fraction == pytest.approx((1.5 - 1.0) / 4)  # 1.5 s waited in all, 1.0 s before
    assert window.worker_busy == pytest.approx({7: 0.5, 8: 0.375})
    assert window.load_s == pytest.approx((0.6 - 0.1) / 20)
    assert window.mean_fill == pytest.approx((60 - 10) / 20)
    assert window.consumer_cpu == pytest.approx((6.0 - 1.0) / 4)
    assert window.workers_cpu == pytest.approx((6.0 - 2.0) / 4)
    assert window.max_fill == 5
    assert later.since(_snapshot(started_at=99.0, elapsed_s=1.0)) is later  # another iteration's: nothing to subtract


def test_since_over_a_real_loop_counts_only_the_window():
    with prefetch.Loader(DATA, batch_size=BATCH, seed=0, workers=0) as loader:
        batches = iter(loader)
        next(batches)
        before = loader.stats()
        started = time.perf_counter()
        for _ in range(3):
            next(batches)
            burn_cpu(0.01)
        wall = time.perf_counter() - started
        window = loader.stats().since(before)
        batches.close()
    assert window.batches == 3 and window.samples == 3 * BATCH
    assert 0 < window.elapsed_s <= wall + 0.05
    assert window.consumer_cpu * window.elapsed_s >= 0.025  # the 3 x 10 ms it burned


def test_loader_of_finds_the_loader_behind_its_generators():
    loader = prefetch.Loader(DATA, batch_size=BATCH, workers=0)
    batches = iter(loader)
    assert prefetch.Loader.of(batches) is loader and prefetch.Loader.of(loader) is loader
    batches.close()
    assert prefetch.Loader.of(batches) is loader  # still, once closed
    gen = prefetch.data_generator(4, DATA, DATA[:, 0], workers=0)
    next(gen)
    owner = prefetch.Loader.of(gen)
    assert owner.stats().batches == 1
    gen.close()
    for other in (iter([1]), (x for x in range(3)), [1, 2], {"a": 1}):
        with pytest.raises(TypeError, match=r"prefetch\.Loader"):
            prefetch.Loader.of(other)
