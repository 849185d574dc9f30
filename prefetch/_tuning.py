"""Sharing the machine with the training step: worker priority, the framework's threads, contention.

The training loop runs on the same cores as the workers. Measured on 2 cores (``bench/e2e.py``), a
loader whose workers compete with the step on equal terms makes training *slower* than the plain
generator: the step's OpenMP threads are preempted in the middle of a parallel region, the others spin
at its barrier, and the training loop -- the critical path -- loses more than the workers gain. Two
decisions follow, both taken on the consumer's side and neither touching the order or the seeding of
any batch (the stream is the same whatever they decide):

* **Workers yield to the training step** (``worker_nice``): each worker raises its own nice value, so the
  kernel runs the step's threads first and the workers on whatever the step leaves. When the loop waits
  for data it leaves everything, and the workers get the whole machine. Raising one's nice value needs
  no privilege; lowering it again would, so it is set once, at worker start.
* **The framework's intra-op threads** (``train_threads="auto"``): when PyTorch is loaded in the
  consumer with more than one intra-op thread, ``ThreadTuner`` measures the loop's batch rate with the
  framework's threads as they are and with half of them, alternating windows of batches, and keeps the
  faster (the fewer threads only if they win clearly). It restores the user's setting when the engine
  stops. ``train_threads=None`` never touches the framework; an int sets it for the loader's life.

``contention`` turns the consumer's and the workers' CPU figures into the sentence ``stats()``,
``StallMonitor`` and ``doctor`` show the user.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

# How far workers step back from the training step (nice increment; 19 is the most, 0 is none).
# Measured on 2 cores (bench/e2e.py, Keras fit and the JPEG pipeline): 0 makes training slower than the
# plain generator; 10 beat 19 on both (19 starves the workers while the step's threads spin).
DEFAULT_WORKER_NICE = 10
# The tuner's schedule: batches before it measures anything (start-up, caches), batches per window,
# and how many windows each candidate gets (alternated: a, b, a, b, a, b), all of which count: a setting that
# runs the step fast by starving the workers drains the buffer, and that only shows over time.
TUNE_WARMUP_BATCHES = 4
TUNE_WINDOW_BATCHES = 6
TUNE_ROUNDS = 3
# The fewer threads are kept only if they make the loop at least this much faster: a noisy machine
# must not talk the tuner into a change that is no real gain.
TUNE_MIN_GAIN = 1.05
# When consumer and workers together use at least this share of the usable cores while the loop
# is not waiting for data, they compete for them -- if the workers use any CPU at all.
WORKERS_BUSY_CORES = 0.05
CONTENTION_SHARE = 0.85
# Below this many cores of the consumer's CPU, and waiting at least WAITING_SHARE of the time, the
# loop does (almost) nothing between batches: there is no training step to starve.
IDLE_CONSUMER_CORES = 0.1
WAITING_SHARE = 0.8


def torch_threads() -> int | None:
    """PyTorch's intra-op threads in this process, or None if PyTorch is not loaded (never imports it)."""
    torch = sys.modules.get("torch")
    get = getattr(torch, "get_num_threads", None)
    if get is None:
        return None
    try:
        return int(get())
    except Exception:  # a half-imported or unusual torch: leave it alone
        return None


def set_torch_threads(threads: int) -> None:
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


@dataclass
class ThreadTuner:
    """Picks the training framework's intra-op threads by measuring the loop's batch rate.

    ``tick()`` is called once per batch the loop asks for, in the loop's own thread (the thread
    whose OpenMP settings matter). It times windows of ``TUNE_WINDOW_BATCHES`` batches -- the whole
    cycle, training step and wait included, which is what the user gets -- for each candidate in
    turn, then keeps the faster (the user's setting unless fewer threads win by ``TUNE_MIN_GAIN``).

    The rate it compares is what the loop can *sustain*: batches taken, less those the window drained
    from the buffer of ready batches (``ready`` at each tick). A setting that speeds the step up by
    starving the workers looks fast while the buffer lasts; counted this way, it does not.
    ``decision`` says what it decided and from which figures.
    """

    original: int  # the framework's threads when the engine started (restored by ``restore``)
    candidates: tuple[int, ...]  # the settings it compares, the original first
    thread: int = field(default_factory=threading.get_ident)  # the loop's thread
    batches: int = 0  # ticks so far
    window_started: float = 0.0
    window: int = 0  # index of the window being timed
    window_ready: int = 0  # ready batches when the window began
    seconds: dict[int, float] = field(default_factory=dict)  # threads -> seconds timed
    sustained: dict[int, int] = field(default_factory=dict)  # threads -> batches taken less batches drained
    chosen: int | None = None
    decision: str = ""

    @classmethod
    def start(cls, setting: str | int | None, workers: int) -> ThreadTuner | None:
        """A tuner for ``train_threads=setting``, or None when there is nothing to tune."""
        current = torch_threads()
        if setting is None or current is None or workers == 0:
            return None
        if isinstance(setting, int):
            tuner = cls(original=current, candidates=(setting,), chosen=setting)
            set_torch_threads(setting)
            tuner.decision = f"training threads {current} -> {setting} (train_threads={setting})"
            return tuner
        if current <= 1:
            return None
        return cls(original=current, candidates=(current, max(1, current // 2)))

    def _current_candidate(self) -> int:
        return self.candidates[self.window % len(self.candidates)]

    def tick(self, ready: int) -> None:
        """One more batch asked for, with ``ready`` batches waiting in the buffer: move the measurement on
        (cheap once it has decided)."""
        if self.chosen is not None or threading.get_ident() != self.thread:
            return
        self.batches += 1
        if self.batches < TUNE_WARMUP_BATCHES:
            return
        now = time.perf_counter()
        into = (self.batches - TUNE_WARMUP_BATCHES) % TUNE_WINDOW_BATCHES
        if into != 0:
            return
        if self.window_started:  # a window just ended
            threads = self._current_candidate()
            self.seconds[threads] = self.seconds.get(threads, 0.0) + now - self.window_started
            drained = max(0, self.window_ready - ready)
            self.sustained[threads] = self.sustained.get(threads, 0) + TUNE_WINDOW_BATCHES - drained
            self.window += 1
        if self.window == TUNE_ROUNDS * len(self.candidates):
            self._decide()
            return
        set_torch_threads(self._current_candidate())
        self.window_ready = ready
        self.window_started = time.perf_counter()

    def _decide(self) -> None:
        rates = {t: max(self.sustained[t], 1) / self.seconds[t] for t in self.seconds}
        best = max(rates, key=lambda t: rates[t])
        gain = rates[best] / rates[self.original]
        self.chosen = best if best != self.original and gain >= TUNE_MIN_GAIN else self.original
        shown = ", ".join(f"{t} threads {rate:.2f} batches/s" for t, rate in rates.items())
        if self.chosen != self.original:
            self.decision = (
                f"training threads {self.original} -> {self.chosen}: the loop ran {gain:.2f}x faster with "
                f"{self.chosen} ({shown}; train_threads=None keeps yours)"
            )
        else:
            self.decision = f"training threads kept at {self.original} ({shown})"
        set_torch_threads(self.chosen)

    def restore(self) -> None:
        """Give the framework back the user's setting. OpenMP settings are per thread, so this is done
        only in the loop's own thread (the usual case: the loop ends, or closes its loader); a loader
        closed from another thread leaves the loop's thread at the tuned setting."""
        if threading.get_ident() == self.thread and torch_threads() not in (None, self.original):
            set_torch_threads(self.original)


def contention(
    cores: int, consumer_cpu: float, workers_cpu: float, wait_fraction: float, consumer_threads: int
) -> str | None:
    """What the CPU figures say about the loop and the workers sharing the cores, or None if nothing.

    ``consumer_cpu`` and ``workers_cpu`` are cores used on average (CPU seconds per wall second).
    """
    if cores <= 0:
        return None
    if consumer_cpu < IDLE_CONSUMER_CORES and wait_fraction >= WAITING_SHARE:
        return (
            "the loop does no work between batches (no training step): the waiting is the loader's full "
            "speed being measured, not a stall"
        )
    used = consumer_cpu + workers_cpu
    if used < CONTENTION_SHARE * cores or wait_fraction >= WAITING_SHARE or workers_cpu < WORKERS_BUSY_CORES:
        return None
    return (
        f"the training step and the workers compete for {cores} core{'s' if cores > 1 else ''}: the loop's "
        f"process used {consumer_cpu:.2f} cores with {consumer_threads} threads, the workers {workers_cpu:.2f}. "
        "Workers step back (worker_nice) so the step goes first; if the loop still waits for data, fewer training "
        "threads (torch.set_num_threads, or train_threads) free cores for the workers, and if it does not, "
        "fewer workers save memory at no cost"
    )
