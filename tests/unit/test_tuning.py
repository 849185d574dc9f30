"""Sharing the cores with the training step: every decision leaves the batch stream unchanged.

The decisions (``_tuning``): workers raise their nice value (``worker_nice``), and with ``train_threads="auto"``
the consumer measures the training framework's intra-op threads and keeps the faster setting. The tuner is
tested here without processes, on a fake clock and a fake ``torch``; the stream, compared byte for byte with
tuning on and off while the tuner really changes the threads mid-run, in tests/engine/test_tuning_engine.py.
"""

from __future__ import annotations

import sys
import threading
import types

import numpy as np
import pytest
from helpers import FakeTorch, PerThreadFakeTorch

import prefetch
from prefetch import _compare, _tuning
from prefetch._tuning import (
    TUNE_MAX_BLOCKS,
    TUNE_MIN_BLOCKS,
    TUNE_MIN_GAIN,
    TUNE_RECHECK_BATCHES,
    TUNE_WARMUP_BATCHES,
    TUNE_WINDOW_BATCHES,
    ThreadTuner,
)

DATA = np.random.default_rng(3).random((96, 6)).astype(np.float32)
LABELS = np.arange(96)
BLOCK_BATCHES = 4 * TUNE_WINDOW_BATCHES  # one block: windows A B B A
# Batches the tuner needs for its earliest verdict, and for its last (settings it cannot tell apart).
TUNING_BATCHES = TUNE_WARMUP_BATCHES + TUNE_MIN_BLOCKS * BLOCK_BATCHES
LONGEST_TUNING_BATCHES = TUNE_WARMUP_BATCHES + TUNE_MAX_BLOCKS * BLOCK_BATCHES


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

    def run_until(self, tuner: ThreadTuner, done, most: int) -> None:
        for _ in range(most):
            if done():
                return
            self.run(tuner, 1)
        raise AssertionError(f"not reached in {most} batches: {tuner.decision!r}, windows {tuner.windows}")


def start_tuner(monkeypatch, torch: FakeTorch, cycle_s, ready=lambda threads: 3) -> tuple[ThreadTuner, FakeClock]:
    clock = FakeClock(torch, cycle_s, ready)
    monkeypatch.setattr(_compare.time, "perf_counter", clock.perf_counter)
    tuner = ThreadTuner.start("auto", workers=2)
    assert tuner is not None
    return tuner, clock


def run_tuner(monkeypatch, torch: FakeTorch, cycle_s, ready=lambda threads: 3, batches=TUNING_BATCHES) -> ThreadTuner:
    tuner, clock = start_tuner(monkeypatch, torch, cycle_s, ready)
    clock.run(tuner, batches + 1)
    return tuner


# --- the tuner, without processes ---------------------------------------------------------------------------


def test_tuner_keeps_fewer_threads_when_the_loop_runs_faster(monkeypatch, fake_torch):
    tuner = run_tuner(monkeypatch, fake_torch, lambda threads: 0.10 if threads == 1 else 0.14)
    assert tuner.chosen == 1 and tuner.measurement().blocks == TUNE_MIN_BLOCKS  # a clear gain: the earliest verdict
    assert fake_torch.threads == 1
    assert "training threads 2 -> 1" in tuner.decision and "1.40x" in tuner.decision
    tuner.release()
    assert fake_torch.threads == 2  # the user's setting comes back when the engine stops


def test_tuner_keeps_the_users_threads_unless_fewer_win_clearly(monkeypatch, fake_torch):
    just_below = 0.10 / (TUNE_MIN_GAIN - 0.01)  # one thread faster, but by less than the gain worth a change
    tuner = run_tuner(monkeypatch, fake_torch, lambda threads: just_below if threads == 1 else 0.10)
    assert tuner.chosen == 2
    assert fake_torch.threads == 2
    assert tuner.decision.startswith("training threads kept at 2") and "no clear gain" in tuner.decision


def test_tuner_measures_in_balanced_blocks(monkeypatch, fake_torch):
    """A B B A, block after block: a drift that is linear over a block hits both settings alike."""
    tuner = run_tuner(monkeypatch, fake_torch, lambda threads: 0.1)
    assert tuner.windows == [2, 1, 1, 2] * TUNE_MIN_BLOCKS
    assert fake_torch.calls[: 4 * TUNE_MIN_BLOCKS] == tuner.windows  # what torch was really set to, window by window


def test_a_warm_up_does_not_favour_the_second_setting(monkeypatch, fake_torch):
    """Both settings equally fast, but the loop starts slow and speeds up over its first block (caches, the
    workers' start): measured A B A B, the warm-up made the second setting look 1.13x faster."""
    ticks = {"n": 0}

    def cycle(threads: int) -> float:
        ticks["n"] += 1
        measured = ticks["n"] - TUNE_WARMUP_BATCHES  # batches into the measurement
        warming = max(0.0, 1.0 - measured / BLOCK_BATCHES) if measured >= 0 else 1.0
        return 0.1 + 0.1 * warming

    tuner = run_tuner(monkeypatch, fake_torch, cycle)
    assert tuner.chosen == 2 and fake_torch.threads == 2, tuner.decision
    assert tuner.decision.startswith("training threads kept at 2")


def start_phased_tuner(monkeypatch, fake_torch):
    """A tuner on a loop where one thread is faster until ``phase["late"]``, then two: started, and run
    until its first verdict (one thread)."""
    phase = {"late": False}

    def cycle(threads: int) -> float:
        faster = 2 if phase["late"] else 1
        return 0.10 if threads == faster else 0.14

    tuner, clock = start_tuner(monkeypatch, fake_torch, cycle)
    clock.run_until(tuner, lambda: tuner.settled, TUNING_BATCHES + 1)
    return tuner, clock, phase


def test_a_verdict_that_later_blocks_contradict_is_undone(monkeypatch, fake_torch):
    """One thread wins the first blocks; then the loop changes and two threads win: the checks the tuner
    goes on making after its verdict overturn it, and the user's setting is back."""
    tuner, clock, phase = start_phased_tuner(monkeypatch, fake_torch)
    assert tuner.chosen == 1 and fake_torch.threads == 1
    phase["late"] = True
    checks = 3 * (TUNE_RECHECK_BATCHES + BLOCK_BATCHES)
    clock.run_until(tuner, lambda: tuner.chosen == 2 and not tuner.measuring, checks)
    assert fake_torch.threads == 2
    assert "kept at 2 again" in tuner.decision and "overturned" in tuner.decision


def test_no_verdict_within_the_noise_keeps_the_users_setting_and_says_why(monkeypatch, fake_torch):
    """Block by block one thread is 1.25x faster, then 0.85x: a mean gain of about 3 % in a spread of 20 %.
    The tuner measures every block it may, keeps the user's setting, and says it could not tell."""
    tuner: ThreadTuner | None = None

    def cycle(threads: int) -> float:
        assert tuner is not None
        odd = len(tuner.trial.comparison.blocks) % 2
        return 0.10 if threads == 2 else 0.10 / (0.85 if odd else 1.25)

    tuner, clock = start_tuner(monkeypatch, fake_torch, cycle)
    clock.run(tuner, LONGEST_TUNING_BATCHES - 1)
    assert tuner.chosen is None and fake_torch.threads in (1, 2)  # still measuring
    clock.run(tuner, 2)
    measured = tuner.measurement()
    assert measured.blocks == TUNE_MAX_BLOCKS and measured.choice == ""
    assert tuner.chosen == 2 and fake_torch.threads == 2
    assert tuner.decision.startswith("training threads kept at 2: 1 threads measured")
    assert "within the noise (+-" in tuner.decision and "train_threads=1 sets them" in tuner.decision


def test_after_a_verdict_the_tuner_checks_again_ever_less_often(monkeypatch, fake_torch):
    tuner, clock = start_tuner(monkeypatch, fake_torch, lambda threads: 0.10 if threads == 1 else 0.14)
    clock.run_until(tuner, lambda: tuner.settled, TUNING_BATCHES + 1)
    decided_at, windows = tuner.batches, len(tuner.windows)
    clock.run(tuner, TUNE_RECHECK_BATCHES - 1)
    assert len(tuner.windows) == windows  # nothing measured until the first check
    clock.run(tuner, 1 + BLOCK_BATCHES)
    assert tuner.windows[windows:] == [2, 1, 1, 2] and tuner.chosen == 1 and fake_torch.threads == 1
    assert tuner.trial.next_check == decided_at + TUNE_RECHECK_BATCHES + BLOCK_BATCHES + 2 * TUNE_RECHECK_BATCHES


def test_reconsider_measures_again_from_scratch(monkeypatch, fake_torch):
    """What a controller of the worker count calls after it changed the workers: the blocks measured with the
    old workers are dropped, and the verdict comes from the new ones alone."""
    tuner, clock, phase = start_phased_tuner(monkeypatch, fake_torch)
    assert tuner.chosen == 1
    phase["late"] = True
    tuner.reconsider()
    assert tuner.measurement().blocks == 0 and not tuner.measuring
    clock.run_until(tuner, lambda: tuner.settled, TUNING_BATCHES + 1)
    assert tuner.chosen == 2 and tuner.measurement().blocks == TUNE_MIN_BLOCKS
    assert tuner.measurement().gain < 1  # B (one thread) measured slower


def test_a_setting_that_starves_the_workers_does_not_look_fast(monkeypatch, fake_torch):
    """Two threads run the step faster but drain the buffer (the workers fall behind): what the loop can
    sustain is the batches it took less those it drained, and there one thread wins."""
    buffer = {"ready": 40, "steps_at_2": 0}

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
    for name in ("torch", "tensorflow", "jax"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert ThreadTuner.start("auto", workers=2) is None
    assert "torch" not in sys.modules


@pytest.mark.parametrize(("module", "name"), [("tensorflow", "TensorFlow"), ("jax", "JAX")])
@pytest.mark.parametrize("setting", ["auto", 3])
def test_tensorflow_and_jax_steps_are_reported_never_touched(monkeypatch, module, name, setting):
    """Their thread pools are fixed when they start: the tuner says so, and how to set them, and touches
    nothing -- the stand-in module has no attribute at all, so any use of it would raise."""
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
    tuner = ThreadTuner.start(setting, workers=2)
    assert tuner is not None and tuner.done and tuner.chosen is None
    for _ in range(LONGEST_TUNING_BATCHES):
        tuner.tick(3)
    tuner.release()
    assert tuner.decision.startswith("training threads not touched") and name in tuner.decision
    assert ("applies to PyTorch only" in tuner.decision) is (setting == 3)
    assert len(_tuning.claims) == 0


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
        ("worker_nice", "fast", TypeError),
        ("train_threads", 0, ValueError),
        ("train_threads", "fast", TypeError),
    ],
)
def test_bad_tuning_options_fail_at_construction(option, value, error):
    with pytest.raises(error, match=option):
        prefetch.Loader(DATA, batch_size=4, **{option: value})


def test_worker_nice_is_10_unless_given():
    assert prefetch.Loader(DATA, batch_size=4).config.worker_nice == 10  # measured: bench/results/e2e-nice.md
    assert prefetch.Loader(DATA, batch_size=4, worker_nice="auto").config.worker_nice == "auto"
    assert prefetch.Loader(DATA, batch_size=4, worker_nice=10).config.worker_nice == 10


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
    monkeypatch.setattr(_compare.time, "perf_counter", clock.perf_counter)
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
    monkeypatch.setattr(_compare.time, "perf_counter", clock.perf_counter)
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
