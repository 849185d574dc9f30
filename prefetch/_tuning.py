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
  framework's threads as they are and with half of them, in balanced blocks of windows (``_compare``),
  keeps the fewer only if they win beyond the measured noise, and checks its verdict again now and then.
  ``train_threads=None`` never touches the framework; an int sets it for the loader's life. TensorFlow's
  and JAX's pools are fixed when they start: with them the tuner reports and touches nothing.
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
from dataclasses import dataclass, field

from ._compare import NOISE, B, Comparison, Trial, Verdict

# The tuner's schedule (``_compare``): batches before it measures anything (start-up, caches), batches per
# window, and blocks of four windows (A B B A): at least TUNE_MIN_BLOCKS before any verdict (the noise is
# their spread), at most TUNE_MAX_BLOCKS before it gives up telling the settings apart -- 4 + 8 * 24 = 196
# batches at most. Longer windows average out more noise per block but take longer to decide.
TUNE_WARMUP_BATCHES = 4
TUNE_WINDOW_BATCHES = 6
TUNE_MIN_BLOCKS = 3
TUNE_MAX_BLOCKS = 8
# The fewer threads are kept only if they make the loop at least this much faster, beyond the noise too:
# a change must be a real gain.
TUNE_MIN_GAIN = 1.05
# After a verdict, one more block this many batches later, then twice as far each time up to the maximum:
# a verdict the loop's later behaviour contradicts is undone, at the cost of half a block at the other
# setting each time (12 batches in 768 at the most spaced: under 2 %).
TUNE_RECHECK_BATCHES = 48
TUNE_RECHECK_MAX_BATCHES = 768
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
    """Picks the training framework's intra-op threads by measuring the loop's batch rate (``_compare.Trial``).

    ``tick()`` is called once per batch the loop asks for, in the loop's own thread (the thread whose
    OpenMP settings matter). Its ``Trial`` times windows with the user's threads (A) and half of them (B)
    until the blocks tell them apart beyond their noise (``_compare.Verdict``) or ``TUNE_MAX_BLOCKS`` could
    not: then the user's setting is kept, and ``decision`` says why. It goes on measuring one block now and
    then, and a verdict the new blocks overturn is undone.

    For a controller of the worker count: ``measurement()`` is what the blocks say now, ``measuring`` is
    True while a block runs (a change then would spoil it), and ``reconsider()`` drops what was measured
    after a change to the workers (the balance between step and workers is another one).
    """

    original: int  # the framework's threads in the loop's thread when the engine started (the user's)
    candidates: tuple[int, ...]  # the settings it compares, the original first
    thread: threading.Thread = field(default_factory=threading.current_thread)  # the loop's thread
    done: bool = False  # nothing more to do: a fixed setting, a report, or the user took the threads
    chosen: int | None = None
    decision: str = ""
    windows: list[int] = field(default_factory=list)  # the threads of every window timed, in order
    trial: Trial = field(init=False)

    def __post_init__(self) -> None:
        comparison = Comparison(TUNE_MIN_GAIN, TUNE_MIN_BLOCKS, TUNE_MAX_BLOCKS)
        self.trial = Trial(
            self._window, self._settle, comparison, TUNE_WINDOW_BATCHES, TUNE_WARMUP_BATCHES,
            TUNE_RECHECK_BATCHES, TUNE_RECHECK_MAX_BATCHES,
        )  # fmt: skip

    @property
    def measuring(self) -> bool:
        return self.trial.measuring

    @property
    def settled(self) -> bool:
        return self.trial.settled

    @property
    def batches(self) -> int:
        return self.trial.batches

    @classmethod
    def start(cls, setting: str | int | None, workers: int) -> ThreadTuner | None:
        """A tuner for ``train_threads=setting`` in the calling (loop) thread, or None when there is nothing
        to tune or report. It claims the thread's setting (``claims``); if another tuner holds it, it changes
        nothing. With TensorFlow or JAX and no PyTorch it only reports (``framework_not_tuned``)."""
        claims.settle()
        current = torch_threads()
        if setting is None or workers == 0:
            return None
        if current is None:
            report = framework_not_tuned(setting)
            return None if report is None else cls(original=0, candidates=(), done=True, decision=report)
        if not isinstance(setting, int) and current <= 1:
            return None
        tuner = cls(original=current, candidates=())
        if claims.claim(tuner) is None:
            tuner.chosen, tuner.done = current, True
            tuner.decision = f"training threads left at {current}: another loader in this thread tunes them already"
            return tuner
        if isinstance(setting, int):
            tuner.candidates, tuner.chosen, tuner.done = (setting,), setting, True
            if tuner._apply(setting):
                tuner.decision = f"training threads {current} -> {setting} (train_threads={setting})"
            return tuner
        tuner.candidates = (current, max(1, current // 2))
        return tuner

    def _apply(self, threads: int) -> bool:
        """Set the loop thread's threads, unless the user changed them since the last time: then they are
        the user's, and the tuner stops."""
        if claims.apply(self, threads):
            return True
        self.chosen, self.done = torch_threads(), True
        self.decision = f"training threads left at {self.chosen}: you set them while the loader had them (yours)"
        return False

    def tick(self, ready: int) -> None:
        """One more batch asked for, with ``ready`` batches waiting in the buffer: move the measurement on
        (a counter and a comparison between measurements)."""
        if self.done or threading.current_thread() is not self.thread:
            return
        self.trial.tick(ready)

    def _window(self, setting: int) -> bool:
        threads = self.candidates[setting]
        if not self._apply(threads):
            return False
        self.windows.append(threads)
        return True

    def _settle(self, verdict: Verdict) -> None:
        """Apply what the blocks say (B only if it won beyond the noise)."""
        user, fewer = self.candidates
        threads = fewer if verdict.choice == B else user
        if not self._apply(threads):
            return
        before, self.chosen = self.chosen, threads
        shown = f"{user} threads {verdict.rates[0]:.2f} batches/s, {fewer} threads {verdict.rates[1]:.2f} batches/s"
        again = " again: later blocks overturned the earlier verdict" if before not in (None, threads) else ""
        if threads != user:
            self.decision = (
                f"training threads {user} -> {fewer}{again}: the loop ran {verdict.gain:.2f}x faster with {fewer} "
                f"(+-{verdict.margin:.0%} over {verdict.blocks} blocks; {shown}; train_threads=None keeps yours)"
            )
        elif verdict.choice == NOISE:
            self.decision = (
                f"training threads kept at {user}{again}: {fewer} threads measured {verdict.gain:.2f}x, within the "
                f"noise (+-{verdict.margin:.0%} over {verdict.blocks} blocks; {shown}); train_threads={fewer} sets them"
            )
        else:
            self.decision = f"training threads kept at {user}{again}: {fewer} threads were {verdict.why} ({shown})"

    def measurement(self) -> Verdict:
        """What the blocks measured so far say (for a controller of the worker count, and ``stats()``)."""
        return self.trial.comparison.verdict()

    def reconsider(self) -> None:
        """The loop changed under the tuner (workers added or parked, their priority changed): forget the
        blocks and measure again, from the setting in force, after a warm-up."""
        if not self.done:
            self.trial.restart()

    def release(self) -> None:
        """Let go of the loop thread's setting: the user's comes back if the thread still has the tuner's
        (now, or -- from another thread -- at the loop thread's next ``settle_training_threads``)."""
        claims.release(self)


# The frameworks whose training threads the tuner reports but never touches: (module, name, how to set them).
REPORTED_FRAMEWORKS = (
    ("tensorflow", "TensorFlow", "tf.config.threading.set_intra_op_parallelism_threads(k) before its first op"),
    ("jax", "JAX", "XLA_FLAGS in the environment before JAX starts"),
)


def framework_not_tuned(setting: str | int) -> str | None:
    """The decision to report when no PyTorch but TensorFlow or JAX is loaded (never imports either): their
    thread pools are fixed when the runtime starts, so no setting can be measured against another; None if
    neither is loaded."""
    loaded = [(name, how) for module, name, how in REPORTED_FRAMEWORKS if module in sys.modules]
    if not loaded:
        return None
    names = " and ".join(name for name, _ in loaded)
    hows = "; ".join(f"{name}: {how}" for name, how in loaded)
    asked = f"train_threads={setting!r} applies to PyTorch only" if isinstance(setting, int) else "not measured"
    return (
        f"training threads not touched ({asked}): {names} fixes its thread pools when it starts, so the loader "
        f"cannot try another setting while the loop runs. To set them yourself -- {hows}"
    )


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
