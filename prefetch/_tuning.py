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
  faster (the fewer threads only if they win clearly). ``train_threads=None`` never touches the framework;
  an int sets it for the loader's life.
* **Whose setting it is** (``ThreadClaims``, one per process): torch's setting belongs to each thread. A
  tuner *claims* its loop thread's setting, remembers the user's value and the last value it set itself,
  and gives the user's value back when it lets go -- only if the thread still has the value the tuner set
  (whoever changed it since owns it now). One claim per thread: a second loader's tuner in the same loop
  leaves the threads to the first. A tuner let go from another thread gives the setting back in the loop's
  own thread, when that thread next leaves or enters a loader (``settle_training_threads``); see
  ``docs/design.md``, *Sharing the cores with the training step*.

``contention`` turns the consumer's and the workers' CPU figures into the sentence ``stats()``,
``StallMonitor`` and ``doctor`` show the user.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

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
class _Claim:
    """One thread's torch setting while a tuner holds it."""

    holder: object  # the tuner
    user: int  # the thread's setting before the tuner changed anything
    applied: int | None = None  # what the tuner last set (None: nothing yet)
    released: bool = False  # let go from another thread: to be given back in this thread (``settle``)


class ThreadClaims:
    """Process-wide: which tuner holds which thread's torch setting, the user's value, and the tuner's last.

    Every change a tuner makes to torch's threads goes through here (``apply``), in the thread it
    claimed, so that letting go (``release``) can tell whether the thread still has the tuner's value
    -- then it gets the user's back -- or someone changed it since -- then it is left alone.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claims: dict[threading.Thread, _Claim] = {}

    def __len__(self) -> int:
        """Threads claimed now."""
        return len(self._claims)

    def claim(self, holder: object) -> int | None:
        """Claim the calling thread's setting for ``holder``; its current value, or None if torch is not
        loaded or another tuner holds this thread already."""
        self.settle()
        with self._lock:
            thread = threading.current_thread()
            current = torch_threads()
            if current is None or thread in self._claims:
                return None
            self._claims[thread] = _Claim(holder, current)
            return current

    def apply(self, holder: object, threads: int) -> bool:
        """Set the calling thread's threads for ``holder``; False (and nothing set) if it does not hold this
        thread -- any more: a setting other than the one it applied last means the user took it back."""
        with self._lock:
            claim = self._claims.get(threading.current_thread())
            if claim is None or claim.holder is not holder or claim.released:
                return False
            if torch_threads() != (claim.user if claim.applied is None else claim.applied):
                del self._claims[threading.current_thread()]
                return False
            set_torch_threads(threads)
            claim.applied = threads
            return True

    def release(self, holder: object) -> None:
        """Let go of ``holder``'s claim, from any thread: the claimed thread's setting is given back now if
        this is that thread, else when that thread next calls ``settle``."""
        with self._lock:
            for thread, claim in list(self._claims.items()):
                if claim.holder is not holder:
                    continue
                if thread is threading.current_thread():
                    self._give_back(thread, claim)
                elif thread.is_alive():
                    claim.released = True
                else:  # its thread has ended, and its setting with it
                    del self._claims[thread]

    def settle(self) -> None:
        """Give back the calling thread's setting if its tuner let go from another thread; forget the
        claims of threads that have ended."""
        with self._lock:
            for thread, claim in list(self._claims.items()):
                if not thread.is_alive():
                    del self._claims[thread]
                elif claim.released and thread is threading.current_thread():
                    self._give_back(thread, claim)

    def _give_back(self, thread: threading.Thread, claim: _Claim) -> None:
        del self._claims[thread]
        if claim.applied is not None and claim.applied != claim.user and torch_threads() == claim.applied:
            set_torch_threads(claim.user)


claims = ThreadClaims()


def settle_training_threads(stopped: ThreadTuner | None = None) -> None:
    """In a loop thread whose loader generator ends: let go of ``stopped`` (the tuner of an engine that was
    taken out of the loader to be closed, maybe by another thread that has not let go of it yet), and give
    back this thread's setting if its tuner was let go from another thread meanwhile (``close()`` from a
    watchdog). Cheap: one locked scan of the claims (one per thread that tunes)."""
    if stopped is not None:
        claims.release(stopped)
    claims.settle()


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

    original: int  # the framework's threads in the loop's thread when the engine started (the user's)
    candidates: tuple[int, ...]  # the settings it compares, the original first
    thread: threading.Thread = field(default_factory=threading.current_thread)  # the loop's thread
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
        """A tuner for ``train_threads=setting`` in the calling (loop) thread, or None when there is nothing
        to tune. It claims the thread's setting (``claims``); if another tuner holds it, it changes nothing."""
        claims.settle()
        current = torch_threads()
        if setting is None or current is None or workers == 0 or (not isinstance(setting, int) and current <= 1):
            return None
        tuner = cls(original=current, candidates=())
        if claims.claim(tuner) is None:
            tuner.chosen = current
            tuner.decision = f"training threads left at {current}: another loader in this thread tunes them already"
            return tuner
        if isinstance(setting, int):
            tuner.candidates, tuner.chosen = (setting,), setting
            if tuner._apply(setting):
                tuner.decision = f"training threads {current} -> {setting} (train_threads={setting})"
            return tuner
        tuner.candidates = (current, max(1, current // 2))
        return tuner

    def _current_candidate(self) -> int:
        return self.candidates[self.window % len(self.candidates)]

    def _apply(self, threads: int) -> bool:
        """Set the loop thread's threads, unless the user changed them since the last time: then they are
        the user's, and the tuner stops."""
        if claims.apply(self, threads):
            return True
        self.chosen = torch_threads()
        self.decision = f"training threads left at {self.chosen}: you set them while the loader had them (yours)"
        return False

    def tick(self, ready: int) -> None:
        """One more batch asked for, with ``ready`` batches waiting in the buffer: move the measurement on
        (cheap once it has decided)."""
        if self.chosen is not None or threading.current_thread() is not self.thread:
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
        if not self._apply(self._current_candidate()):
            return
        self.window_ready = ready
        self.window_started = time.perf_counter()

    def _decide(self) -> None:
        rates = {t: max(self.sustained[t], 1) / self.seconds[t] for t in self.seconds}
        best = max(rates, key=lambda t: rates[t])
        gain = rates[best] / rates[self.original]
        chosen = best if best != self.original and gain >= TUNE_MIN_GAIN else self.original
        if not self._apply(chosen):
            return
        self.chosen = chosen
        shown = ", ".join(f"{t} threads {rate:.2f} batches/s" for t, rate in rates.items())
        if self.chosen != self.original:
            self.decision = (
                f"training threads {self.original} -> {self.chosen}: the loop ran {gain:.2f}x faster with "
                f"{self.chosen} ({shown}; train_threads=None keeps yours)"
            )
        else:
            self.decision = f"training threads kept at {self.original} ({shown})"

    def release(self) -> None:
        """Let go of the loop thread's setting: the user's comes back if the thread still has the tuner's
        (now, or -- from another thread -- at the loop thread's next ``settle_training_threads``)."""
        claims.release(self)


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
