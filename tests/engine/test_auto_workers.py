"""workers="auto" parks and adds workers while the loop runs, and the stream does not change.

The figures are fake (``AutoScaler.measure`` is replaced by a script), so the changes happen at known
points; the coordinator applying them is checked from which worker made each batch, and a worker is
SIGKILLed as a change is sent."""

from __future__ import annotations

import hashlib
import os
import signal

import numpy as np
import pytest
from helpers import AheadSource, augment, fingerprint, wait_until

import prefetch
from prefetch import _budget, autoscaler
from prefetch.autoscaler import AutoScaler
from prefetch.core.autoscale import Measure
from prefetch.processes.run import ProcessRun

BUDGET = 3  # the CPU budget the test gives the loader, whatever the machine has
N, BATCH_SIZE = 160, 4  # 40 batches an epoch, two epochs
PARK = Measure(wait=0.0, busy=1.0, loop_cpu=2.0, run_queue=0.5)  # calm, contended: one fewer
ADD = Measure(wait=0.5, busy=1.0, loop_cpu=0.1, run_queue=0.0)  # starved, saturated: one more
HOLD = Measure(wait=0.03, busy=0.5, loop_cpu=0.5, run_queue=0.0)  # in between: nothing
HOLD_WINDOWS = 12  # windows at one worker before adding again: longer than the window (in batches)


def park_at_once(scaler: AutoScaler, before, parked) -> None:
    """No trial: the park is kept as the controller decided it (these tests script the figures)."""
    scaler.apply(parked)


def with_maker(batch):
    """The batch, and the pid of the process that made it (left out of the hash)."""
    return {"x": batch, "pid": np.int64(os.getpid())}


class Script:
    """Fake figures: park down to one worker, hold there, then add back up to the budget."""

    def __init__(self) -> None:
        self.phase, self.held = "down", 0

    def measure(self, scaler: AutoScaler, was, now) -> Measure:
        workers = scaler.setting.workers
        if self.phase == "down" and workers == 1:
            self.phase = "hold"
        if self.phase == "hold":
            self.held += 1
            self.phase = "up" if self.held > HOLD_WINDOWS else "hold"
            return HOLD
        if self.phase == "up":
            return ADD if workers < BUDGET else HOLD
        return PARK


def two_epochs(workers, start_method, makers=None):
    """SHA-256 of two epochs' data, and the loader's last stats (None with workers=0)."""
    digest = hashlib.sha256()
    loader = prefetch.Loader(
        np.arange(N * 3, dtype=np.float32).reshape(N, 3),
        np.arange(N),
        batch_size=BATCH_SIZE,
        seed=7,
        epochs=2,
        transform=augment,
        batch_transform=with_maker,
        workers=workers,
        start_method=start_method,
        train_threads=None,  # the thread tuner would hold the count while it measures (torch may be imported)
    )
    with loader:
        for _ in range(2):
            for batch in loader:
                digest.update(repr(fingerprint(batch["x"])).encode())
                if makers is not None:
                    makers.append(int(batch["pid"]))
        stats = loader.stats() if workers != 0 else None
        return digest.hexdigest(), stats, loader.config.prefetch


@pytest.mark.timeout(60)
def test_auto_parks_and_adds_workers_mid_run_with_a_worker_killed_and_the_stream_is_byte_identical(
    monkeypatch, start_method
):
    budget = _budget.CpuBudget(BUDGET, None, BUDGET, _budget.Ranks(1, "test"))
    monkeypatch.setattr(_budget, "cpu_budget", lambda ranks=None, **_: budget)
    monkeypatch.setattr(autoscaler, "WINDOW_BATCHES", 2)
    monkeypatch.setattr(autoscaler, "WINDOW_MIN_S", 0.0)
    script = Script()
    monkeypatch.setattr(AutoScaler, "measure", lambda scaler, was, now: script.measure(scaler, was, now))
    monkeypatch.setattr(AutoScaler, "try_park", park_at_once)
    sent, killed = [], []
    resize = ProcessRun.resize

    def resize_and_kill(run: ProcessRun, workers: int, window: int) -> None:
        resize(run, workers, window)
        sent.append(workers)
        if sent == [2, 1, 2]:  # the first add: SIGKILL the one working worker as the coordinator adds one
            killed.append(run.worker_pids[0])
            os.kill(run.worker_pids[0], signal.SIGKILL)

    monkeypatch.setattr(ProcessRun, "resize", resize_and_kill)
    makers: list[int] = []
    auto_sha, stats, deepest = two_epochs("auto", start_method, makers)
    reference_sha, _, _ = two_epochs(0, start_method)
    assert auto_sha == reference_sha
    assert sent == [2, 1, 2, 3]  # every change was made
    assert [workers for _, workers, _ in stats.auto_changes] == sent
    assert stats.auto_workers == BUDGET and stats.restarts == 1 and killed
    park_at, add_at, last_at = (stats.auto_changes[i][0] for i in (1, 2, 3))
    # Every batch dispatched after the coordinator parked all workers but one (batches at or beyond
    # park_at + deepest) and taken before the add was sent came from that one worker.
    one_worker = makers[park_at + deepest : add_at]
    assert len(one_worker) >= 5 and set(one_worker) == {killed[0]}
    # After the adds, the work is shared again.
    assert len(set(makers[last_at + deepest :])) >= 2


@pytest.mark.timeout(60)
def test_auto_shortens_the_window_with_the_workers_it_parks(monkeypatch, tmp_path):
    """Parked from 3 workers to 1, the window shrinks to 1's share of prefetch=6 (2): once the coordinator has it,
    no load runs further ahead of the consumer than that (counted, as in ``consume_within_the_bound``)."""
    budget = _budget.CpuBudget(BUDGET, None, BUDGET, _budget.Ranks(1, "test"))
    monkeypatch.setattr(_budget, "cpu_budget", lambda ranks=None, **_: budget)
    monkeypatch.setattr(autoscaler, "WINDOW_BATCHES", 2)
    monkeypatch.setattr(autoscaler, "WINDOW_MIN_S", 0.0)
    monkeypatch.setattr(AutoScaler, "measure", lambda scaler, was, now: PARK)
    monkeypatch.setattr(AutoScaler, "try_park", park_at_once)
    deepest, source = 6, AheadSource(400, 4, str(tmp_path))
    with prefetch.Loader(
        source, batch_size=4, shuffle=False, workers="auto", prefetch=deepest, train_threads=None
    ) as loader:
        stream = loader.stream()
        taken = 0
        while len(loader.stats().auto_changes) < BUDGET - 1:  # parked down to one worker
            taken += 1
            source.take(taken)
            next(stream)
        parked_at, workers, window = loader.stats().auto_changes[-1]
        assert (workers, window) == (1, 2)
        for _ in range(15):
            taken += 1
            source.take(taken)
            next(stream)
            wanted = (taken + window - 1) * source.batch_size
            wait_until(lambda: source.loaded() >= wanted, what=f"{wanted} samples loaded")  # noqa: B023
        stream.close()
    after = [batch + 1 - then for batch, then in source.loads() if batch >= parked_at + deepest]
    assert after and max(after) == window - 1


@pytest.mark.timeout(60)
def test_the_next_epoch_starts_a_new_window(monkeypatch):
    restarts = []
    monkeypatch.setattr(AutoScaler, "restart", lambda scaler: restarts.append(scaler))
    with prefetch.Loader(np.arange(40), batch_size=4, epochs=3, workers="auto", train_threads=None) as loader:
        for _ in range(3):
            assert len(list(loader)) == 10
    assert len(restarts) == 2 and restarts[0] is restarts[1]  # the kept engine's, at each adoption


class MeasuringTuner:
    """A thread tuner that is timing a window until the test says it is done (the engine's view of one)."""

    decision = None

    def __init__(self) -> None:
        self.measuring = True

    def tick(self, fill: int) -> None:
        pass

    def reconsider(self) -> None:
        pass

    def release(self) -> None:
        pass


@pytest.mark.timeout(60)
def test_the_count_holds_while_the_thread_tuner_measures(monkeypatch):
    """One thing at a time: no resize while the thread tuner times a window, resizes once it is done."""
    from prefetch import consumer

    budget = _budget.CpuBudget(BUDGET, None, BUDGET, _budget.Ranks(1, "test"))
    monkeypatch.setattr(_budget, "cpu_budget", lambda ranks=None, **_: budget)
    monkeypatch.setattr(autoscaler, "WINDOW_BATCHES", 2)
    monkeypatch.setattr(autoscaler, "WINDOW_MIN_S", 0.0)
    monkeypatch.setattr(AutoScaler, "measure", lambda scaler, was, now: PARK)
    monkeypatch.setattr(AutoScaler, "try_park", park_at_once)
    tuner = MeasuringTuner()
    monkeypatch.setattr(consumer.ThreadTuner, "start", staticmethod(lambda *args, **kwargs: tuner))
    with prefetch.Loader(np.arange(400), batch_size=4, shuffle=False, workers="auto") as loader:
        stream = loader.stream()
        for _ in range(30):  # fifteen windows' worth: a park would have come after two
            next(stream)
        assert loader.stats().auto_changes == ()
        tuner.measuring = False
        for _ in range(30):
            next(stream)
        assert loader.stats().auto_changes  # the same figures park workers now
        stream.close()


class CountingTuner(MeasuringTuner):
    """A thread tuner that is never timing; it notes, at each tick, whether a park was on trial."""

    def __init__(self, scalers: list[AutoScaler]) -> None:
        self.measuring, self.scalers, self.ticks = False, scalers, []

    def tick(self, fill: int) -> None:
        self.ticks.append(bool(self.scalers) and self.scalers[0].measuring)


@pytest.mark.timeout(60)
def test_a_park_on_trial_alternates_the_workers_alone_and_the_stream_is_byte_identical(monkeypatch, start_method):
    """The trial's windows run A B B A (the window held), nothing else is timed meanwhile, and whatever it
    decides, two epochs hash as workers=0's."""
    from prefetch import consumer

    budget = _budget.CpuBudget(BUDGET, None, BUDGET, _budget.Ranks(1, "test"))
    monkeypatch.setattr(_budget, "cpu_budget", lambda ranks=None, **_: budget)
    monkeypatch.setattr(autoscaler, "WINDOW_BATCHES", 2)
    monkeypatch.setattr(autoscaler, "WINDOW_MIN_S", 0.0)
    monkeypatch.setattr(autoscaler, "PARK_WINDOW_BATCHES", 2)
    monkeypatch.setattr(AutoScaler, "measure", lambda scaler, was, now: PARK)
    scalers: list[AutoScaler] = []
    try_park = AutoScaler.try_park

    def noted(scaler: AutoScaler, before, parked) -> None:
        scalers.append(scaler)
        try_park(scaler, before, parked)

    monkeypatch.setattr(AutoScaler, "try_park", noted)
    tuner = CountingTuner(scalers)
    monkeypatch.setattr(consumer.ThreadTuner, "start", staticmethod(lambda *args, **kwargs: tuner))
    sent = []
    resize = ProcessRun.resize

    def noting(run: ProcessRun, workers: int, window: int) -> None:
        resize(run, workers, window)
        sent.append((workers, window))

    monkeypatch.setattr(ProcessRun, "resize", noting)
    auto_sha, _, deepest = two_epochs("auto", start_method)
    reference_sha, _, _ = two_epochs(0, start_method)
    assert auto_sha == reference_sha
    assert scalers, "no park was put on trial"
    trial = sent[: 2 * autoscaler.PARK_MIN_BLOCKS]  # the first blocks of the first trial
    assert trial == [(BUDGET - 1, deepest), (BUDGET, deepest)] * autoscaler.PARK_MIN_BLOCKS
    assert tuner.ticks and True not in tuner.ticks  # the tuner was not ticked while a park was timed
