"""Sharing the cores with the training step: every decision leaves the batch stream unchanged.

The decisions (``_tuning``): workers raise their nice value (``worker_nice``), and with ``train_threads="auto"``
the consumer measures the training framework's intra-op threads and keeps the faster setting. The tuner is
tested here without processes, on a fake clock and a fake ``torch``; the stream, compared byte for byte with
tuning on and off while the tuner really changes the threads mid-run, in tests/engine/test_tuning_engine.py.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
from helpers import FakeTorch, PerThreadFakeTorch

import prefetch
from prefetch import _tuning
from prefetch._tuning import (
    TUNE_MIN_GAIN,
    TUNE_ROUNDS,
    TUNE_WARMUP_BATCHES,
    TUNE_WINDOW_BATCHES,
    ThreadTuner,
)

DATA = np.random.default_rng(3).random((96, 6)).astype(np.float32)
LABELS = np.arange(96)
# Batches the tuner needs to decide: its warm-up, then every window of every candidate.
TUNING_BATCHES = TUNE_WARMUP_BATCHES + TUNE_ROUNDS * 2 * TUNE_WINDOW_BATCHES


@pytest.fixture(autouse=True)
def fresh_claims(monkeypatch):
    """Each test's tuners claim threads in a registry of their own (some tests leave a tuner undecided)."""
    monkeypatch.setattr(_tuning, "claims", _tuning.ThreadClaims())


class FakeClock:
    """``time.perf_counter`` for the tuner: each batch of the loop takes what ``cycle_s(threads)`` says, and
    ``ready(threads)`` is how many batches wait in the buffer when the loop asks for the next one."""

    def __init__(self, torch: FakeTorch, cycle_s, ready):
        self.torch, self.cycle_s, self.ready, self.now = torch, cycle_s, ready, 0.0

    def perf_counter(self) -> float:
        return self.now

    def run(self, tuner: ThreadTuner, batches: int) -> None:
        for _ in range(batches):
            tuner.tick(self.ready(self.torch.threads))
            self.now += self.cycle_s(self.torch.threads)


def run_tuner(monkeypatch, torch: FakeTorch, cycle_s, ready=lambda threads: 3) -> ThreadTuner:
    clock = FakeClock(torch, cycle_s, ready)
    monkeypatch.setattr(_tuning.time, "perf_counter", clock.perf_counter)
    tuner = ThreadTuner.start("auto", workers=2)
    assert tuner is not None
    clock.run(tuner, TUNING_BATCHES + 5)
    return tuner


# --- the tuner, without processes ---------------------------------------------------------------------------


def test_tuner_keeps_fewer_threads_when_the_loop_runs_faster(monkeypatch, fake_torch):
    tuner = run_tuner(monkeypatch, fake_torch, lambda threads: 0.10 if threads == 1 else 0.14)
    assert tuner.chosen == 1
    assert fake_torch.threads == 1
    assert "training threads 2 -> 1" in tuner.decision and "1.40x" in tuner.decision
    tuner.release()
    assert fake_torch.threads == 2  # the user's setting comes back when the engine stops


def test_tuner_keeps_the_users_threads_unless_fewer_win_clearly(monkeypatch, fake_torch):
    just_below = 0.10 * (TUNE_MIN_GAIN - 0.01)  # one thread faster, but within the noise margin
    tuner = run_tuner(monkeypatch, fake_torch, lambda threads: just_below if threads == 1 else 0.10)
    assert tuner.chosen == 2
    assert fake_torch.threads == 2
    assert tuner.decision.startswith("training threads kept at 2")


def test_tuner_measures_each_candidate_in_alternating_windows(monkeypatch, fake_torch):
    run_tuner(monkeypatch, fake_torch, lambda threads: 0.1)
    measured = fake_torch.calls[: TUNE_ROUNDS * 2]
    assert measured == [2, 1] * TUNE_ROUNDS  # a, b, a, b: drift on the machine hits both alike


def test_a_setting_that_starves_the_workers_does_not_look_fast(monkeypatch, fake_torch):
    """Two threads run the step faster but drain the buffer (the workers fall behind): what the loop can
    sustain is the batches it took less those it drained, and there one thread wins."""
    buffer = {"ready": 12, "steps_at_2": 0}

    def cycle(threads: int) -> float:  # one step of the loop, with the threads in force for it
        if threads == 1:
            return 0.15
        buffer["steps_at_2"] += 1
        if buffer["steps_at_2"] % 2 == 0:  # the workers make one batch for every two the loop takes
            buffer["ready"] -= 1
        return 0.10

    tuner = run_tuner(monkeypatch, fake_torch, cycle, lambda threads: buffer["ready"])
    assert tuner.chosen == 1, tuner.decision  # counted by time alone, 2 threads (10 batches/s) would win
    assert "2 threads 5.00 batches/s" in tuner.decision


def test_every_candidate_gets_every_round(monkeypatch, fake_torch):
    run_tuner(monkeypatch, fake_torch, lambda threads: 0.10 if threads == 1 else 0.20)
    assert fake_torch.calls == [2, 1] * TUNE_ROUNDS + [1]  # even a clear difference gets all rounds


def test_tuner_ignores_batches_asked_from_another_thread(monkeypatch, fake_torch):
    tuner = ThreadTuner.start("auto", workers=2)
    assert tuner is not None
    other = threading.Thread(target=lambda: [tuner.tick(3) for _ in range(TUNING_BATCHES + 5)])
    other.start()
    other.join()
    assert tuner.batches == 0 and fake_torch.calls == []  # OpenMP settings belong to the loop's own thread


@pytest.mark.parametrize(
    ("setting", "threads", "workers", "tunes"),
    [
        (None, 2, 2, False),  # the user said never touch the framework
        ("auto", 1, 2, False),  # nothing to halve
        ("auto", 2, 0, False),  # no workers to share the cores with
        ("auto", 2, 2, True),
    ],
)
def test_tuner_starts_only_when_there_is_something_to_tune(monkeypatch, setting, threads, workers, tunes):
    monkeypatch.setitem(sys.modules, "torch", FakeTorch(threads))
    assert (ThreadTuner.start(setting, workers) is not None) is tunes


def test_no_tuner_without_torch_and_torch_never_imported(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert ThreadTuner.start("auto", workers=2) is None
    assert "torch" not in sys.modules


def test_train_threads_int_sets_them_for_the_loaders_life(fake_torch):
    tuner = ThreadTuner.start(1, workers=2)
    assert tuner is not None and fake_torch.threads == 1 and tuner.chosen == 1
    tuner.release()
    assert fake_torch.threads == 2


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("worker_nice", -1, ValueError),
        ("worker_nice", 20, ValueError),
        ("worker_nice", 1.5, TypeError),
        ("train_threads", 0, ValueError),
        ("train_threads", "fast", TypeError),
    ],
)
def test_bad_tuning_options_fail_at_construction(option, value, error):
    with pytest.raises(error, match=option):
        prefetch.Loader(DATA, batch_size=4, **{option: value})


# --- whose setting it is: the tuner gives back the user's setting, and only what it set itself ----------------


def measure_until_halved(tuner: ThreadTuner, clock: FakeClock, torch: FakeTorch) -> None:
    """Tick ``tuner`` until it has switched the threads to its second candidate (mid-measurement)."""
    for _ in range(TUNING_BATCHES):
        tuner.tick(3)
        clock.now += 0.1
        if torch.threads == tuner.candidates[-1]:
            return
    raise AssertionError(f"the tuner never switched to {tuner.candidates[-1]}: {torch.calls}")


def test_the_users_change_after_the_decision_is_theirs_to_keep(monkeypatch, fake_torch):
    tuner = run_tuner(monkeypatch, fake_torch, lambda threads: 0.10)  # keeps the user's 2
    fake_torch.set_num_threads(1)  # a phase of the user's own, after the tuner decided
    tuner.release()
    assert fake_torch.threads == 1


def test_the_users_change_during_a_fixed_setting_is_theirs_to_keep(fake_torch):
    tuner = ThreadTuner.start(1, workers=2)
    assert tuner is not None and fake_torch.threads == 1
    fake_torch.set_num_threads(3)
    tuner.release()
    assert fake_torch.threads == 3


def test_the_users_change_during_the_measurement_stops_the_tuner(monkeypatch):
    torch = FakeTorch(4)
    monkeypatch.setitem(sys.modules, "torch", torch)
    clock = FakeClock(torch, lambda threads: 0.1, lambda threads: 3)
    monkeypatch.setattr(_tuning.time, "perf_counter", clock.perf_counter)
    tuner = ThreadTuner.start("auto", workers=2)
    assert tuner is not None
    measure_until_halved(tuner, clock, torch)
    torch.set_num_threads(3)  # the user's own decision, mid-measurement
    calls = len(torch.calls)
    clock.run(tuner, TUNING_BATCHES)
    assert torch.calls[calls:] == [] and torch.threads == 3  # never touched again
    assert "3" in tuner.decision and "yours" in tuner.decision
    tuner.release()
    assert torch.threads == 3


@pytest.mark.parametrize("first_closed", ["training", "evaluation"])
def test_two_tuners_in_one_thread_give_back_the_users_setting(monkeypatch, first_closed):
    """An evaluation loader opened while the training loader measures (same loop thread): after both close,
    the thread has the user's setting, in either order."""
    torch = FakeTorch(4)
    monkeypatch.setitem(sys.modules, "torch", torch)
    clock = FakeClock(torch, lambda threads: 0.1, lambda threads: 3)
    monkeypatch.setattr(_tuning.time, "perf_counter", clock.perf_counter)
    training = ThreadTuner.start("auto", workers=2)
    assert training is not None
    measure_until_halved(training, clock, torch)
    assert torch.threads == 2
    evaluation = ThreadTuner.start("auto", workers=2)
    assert evaluation is not None
    for _ in range(TUNING_BATCHES + 5):  # both loops take batches in turn
        training.tick(3)
        evaluation.tick(3)
        clock.now += 0.1
    tuners = {"training": training, "evaluation": evaluation}
    tuners.pop(first_closed).release()
    tuners.popitem()[1].release()
    assert torch.threads == 4


def test_a_second_tuner_in_the_thread_leaves_the_threads_to_the_first(monkeypatch):
    torch = FakeTorch(4)
    monkeypatch.setitem(sys.modules, "torch", torch)
    first = ThreadTuner.start(2, workers=2)
    second = ThreadTuner.start("auto", workers=2)
    assert first is not None and second is not None
    second.tick(3)
    assert torch.calls == [2]
    assert "another loader in this thread" in second.decision
    second.release()
    assert torch.threads == 2  # the first still holds them
    first.release()
    assert torch.threads == 4


def test_a_release_from_another_thread_gives_back_in_the_loop_thread(monkeypatch):
    """OpenMP settings are per thread: a tuner let go from another thread (close() from a watchdog) gives the
    loop thread's setting back when that thread next enters prefetch (``settle``), and never touches the
    other thread's."""
    torch = PerThreadFakeTorch(4)
    monkeypatch.setitem(sys.modules, "torch", torch)
    tuner = ThreadTuner.start(2, workers=2)
    assert tuner is not None and torch.threads == 2
    seen = {}

    def watchdog() -> None:
        torch.set_num_threads(3)  # the watchdog thread's own setting
        tuner.release()
        seen["watchdog"] = torch.threads

    other = threading.Thread(target=watchdog)
    other.start()
    other.join()
    assert seen == {"watchdog": 3}
    assert torch.threads == 2  # not yet: only this thread can change its own setting
    _tuning.settle_training_threads()
    assert torch.threads == 4
