"""``worker_nice="auto"``: the workers step back from the training step only when the loop shows it helps.

Stepping back (a higher nice value for the workers) helps a loop whose training step is the critical path:
the kernel runs the step's threads first, and the workers, which keep up anyway, on what they leave. It
hurts a loop that waits for data: the workers are then the critical path, and the runnable threads at the
step's priority -- an OpenMP pool spin-waiting for its next region -- take the cores the workers need. So
the workers start level with the loop (nice +0) and the consumer watches the share of its time the loop
waits for data, span by span:

* below ``COMPUTE_BOUND_WAIT_SHARE`` the loop is compute-bound: the workers step back by ``step``
  (``DEFAULT_WORKER_NICE``), every thread of every worker on this machine, replacements as they appear;
* after that, above ``DATA_BOUND_WAIT_SHARE`` (the workers fell behind at the lower priority) they come back
  level -- if the system lets them: lowering a nice value needs privilege (``CAP_SYS_NICE`` or
  ``RLIMIT_NICE``); without it they stay back and ``decision`` says why and what to set. A loop whose
  workers came back never steps them back again (no oscillation).

Raising a process's nice value needs no privilege for one's own processes, so the step back always works.
The decision changes no batch. See ``docs/design.md``, *Sharing the cores with the training step*.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ._compare import B, Comparison, Trial, Verdict

# Batches before the first span (start-up: the loop waits for the first batches whatever the workers'
# priority), and batches per span: longer spans decide later, shorter ones on fewer waits.
NICE_WARMUP_BATCHES = 4
NICE_SPAN_BATCHES = 24
# A loop that waits less than this share of a span is compute-bound: the workers keep up with room to
# spare, and stepping back costs them little. Above DATA_BOUND_WAIT_SHARE after stepping back, it cost
# them too much. The gap between the two keeps a loop near one threshold from flipping.
COMPUTE_BOUND_WAIT_SHARE = 0.10
DATA_BOUND_WAIT_SHARE = 0.25


# Where the workers may come back level (privilege), worker_nice="auto" compares the loop's rate with them
# stepped back (A) and level (B) in balanced blocks (``_compare.Trial``): windows of NICE_WINDOW_BATCHES, at
# least NICE_MIN_BLOCKS blocks, at most NICE_MAX_BLOCKS, then a check now and then. Level is chosen only if the
# loop runs at least NICE_MIN_GAIN faster with it, beyond the noise: stepped back is the safer setting for a
# compute-bound step.
NICE_WINDOW_BATCHES = 6
NICE_MIN_BLOCKS = 3
NICE_MAX_BLOCKS = 8
NICE_MIN_GAIN = 1.03
NICE_RECHECK_BATCHES = 96
NICE_RECHECK_MAX_BATCHES = 768
CAP_SYS_NICE = 23  # the capability's bit in /proc/self/status's CapEff


def may_lower_nice(base: int) -> bool:
    """Whether this process may set a nice value back down to ``base``: ``CAP_SYS_NICE``, or an ``RLIMIT_NICE``
    that allows it (Linux; False where neither can be read)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
        if soft == resource.RLIM_INFINITY or soft >= 20 - base:
            return True
    except (ImportError, AttributeError, ValueError, OSError):
        pass
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def own_nice() -> int:
    """The calling thread's nice value (Linux: nice is per thread; workers inherit their starter's)."""
    return os.getpriority(os.PRIO_PROCESS, 0)


def set_nice(pid: int, nice: int) -> None:
    """Set every thread of process ``pid`` to ``nice``. A process that has ended is skipped; lowering a
    value without the privilege raises ``PermissionError``."""
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except (FileNotFoundError, ProcessLookupError):
        return
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:  # the thread ended meanwhile
            continue


@dataclass
class StepBack:
    """Decides the workers' nice value from the loop's waiting (see the module docstring).

    ``tick(waited_s)`` is called once per batch the loop asks for, with the engine's total seconds waited
    for data so far; it returns True when it changed the workers' priority (the thread tuner's
    measurements are then stale: ``ThreadTuner.reconsider``)."""

    step: int  # how far the workers step back (a nice increment)
    pids: Callable[[], list[int]]  # the workers on this machine, now
    renice: Callable[[int, int], None] = set_nice
    base: int = field(default_factory=own_nice)  # the workers' value when level (the loop's, which they inherit)
    batches: int = 0
    next_span: int = NICE_WARMUP_BATCHES  # the tick at which the span being measured ends
    span_started: float = 0.0
    span_waited: float = 0.0
    stepped: bool = False  # the workers are stepped back
    came_back: bool = False  # they were, and came back level: never again
    stuck: bool = False  # they should come back, but may not (no privilege)
    reniced: set[int] = field(default_factory=set)  # workers set to the stepped-back value
    decision: str = ""

    @property
    def stepped_nice(self) -> int:
        return min(19, self.base + self.step)

    times_windows = False  # it watches the loop's waiting, and never changes a setting to time it
    measuring = False

    def tick(self, ready: int, waited_s: float) -> bool:
        """One more batch asked for; ``waited_s``: the loop's seconds waited for data so far (``ready``, the
        batches in the buffer, is for ``NiceTrial``). Cheap between spans (a counter)."""
        self.batches += 1
        if self.batches < self.next_span:
            return False
        now = time.perf_counter()
        first = self.batches == NICE_WARMUP_BATCHES
        share = (waited_s - self.span_waited) / max(now - self.span_started, 1e-9)
        self.span_started, self.span_waited, self.next_span = now, waited_s, self.batches + NICE_SPAN_BATCHES
        return False if first else self._decide(min(1.0, max(0.0, share)))

    def _decide(self, share: float) -> bool:
        waited = f"the loop waited for data {share:.0%} of the last {NICE_SPAN_BATCHES} batches"
        if self.stepped and share > DATA_BOUND_WAIT_SHARE and not self.stuck:
            return self._come_back(waited)
        if self.stepped:
            self._renice_new()  # replacements start level
            return False
        if share < COMPUTE_BOUND_WAIT_SHARE and not self.came_back:
            self.stepped = True
            self._renice_new()
            self.decision = (
                f"workers stepped back to nice +{self.step}: {waited} (the training step is the critical path, "
                "so it goes first; worker_nice=0 keeps them level)"
            )
            return True
        if not self.came_back:
            self.decision = (
                f"workers level with the training step (nice +0): {waited}, so they are on its critical path "
                f"(they step back once it waits under {COMPUTE_BOUND_WAIT_SHARE:.0%})"
            )
        return False

    def _renice_new(self) -> None:
        for pid in self.pids():
            if pid not in self.reniced:
                self.reniced.add(pid)
                try:
                    self.renice(pid, self.stepped_nice)
                except PermissionError:  # not ours to change (never expected for a raise): leave it
                    pass

    def _come_back(self, waited: str) -> bool:
        try:
            for pid in self.reniced:
                self.renice(pid, self.base)
        except PermissionError:
            self.stuck = True
            self.decision = (
                f"workers stay at nice +{self.step}: {waited} since they stepped back, but lowering a nice value "
                "needs privilege (CAP_SYS_NICE, or an RLIMIT_NICE that allows it); worker_nice=0 keeps them level "
                "from the start"
            )
            return False
        self.stepped, self.came_back = False, True
        self.reniced.clear()
        self.decision = f"workers back level with the training step (nice +0): {waited} while they stepped back"
        return True


@dataclass
class NiceTrial:
    """``worker_nice="auto"`` where lowering a nice value is allowed: the loop's rate decides (``_compare.Trial``).

    Setting A is the workers stepped back by ``step``, B level with the loop. After the verdict the chosen
    one stays in force (and reaches replacement workers) between the checks that may overturn it. ``tick``
    returns True when the chosen setting changed (the thread tuner's measurements are then stale)."""

    step: int
    pids: Callable[[], list[int]]  # the workers on this machine, now
    renice: Callable[[int, int], None] = set_nice
    base: int = field(default_factory=own_nice)
    chosen: int | None = None  # 0: stepped back, 1: level; None before the first verdict
    in_force: dict[int, int] = field(default_factory=dict)  # worker pid -> the nice value it was set to
    changed: bool = False
    decision: str = ""
    trial: Trial = field(init=False)

    def __post_init__(self) -> None:
        comparison = Comparison(NICE_MIN_GAIN, NICE_MIN_BLOCKS, NICE_MAX_BLOCKS)
        self.trial = Trial(
            self._window, self._settle, comparison, NICE_WINDOW_BATCHES, NICE_WARMUP_BATCHES,
            NICE_RECHECK_BATCHES, NICE_RECHECK_MAX_BATCHES,
        )  # fmt: skip

    times_windows = True  # the thread tuner's windows and its own never overlap (``Engine._tick_choosers``)

    @property
    def measuring(self) -> bool:
        return self.trial.measuring

    @property
    def stepped_nice(self) -> int:
        return min(19, self.base + self.step)

    def tick(self, ready: int, waited_s: float) -> bool:
        """One more batch asked for, ``ready`` batches in the buffer (``waited_s`` is for ``StepBack``)."""
        self.changed = False
        self.trial.tick(ready)
        if not self.trial.measuring and self.chosen is not None and self.trial.batches % NICE_SPAN_BATCHES == 0:
            self._set(self.chosen)  # replacements start level
        return self.changed

    def _set(self, setting: int) -> bool:
        nice = self.stepped_nice if setting == 0 else self.base
        for pid in self.pids():
            if self.in_force.get(pid) != nice:
                try:
                    self.renice(pid, nice)
                except PermissionError:
                    return False
                self.in_force[pid] = nice
        return True

    def _window(self, setting: int) -> bool:
        if self._set(setting):
            if self.chosen is None:
                self.decision = f"measuring: the workers take turns at nice +{self.step} and level (nice +0)"
            return True
        self._set(0)  # a raise needs no privilege: the safe setting
        self.chosen = 0
        self.decision = (
            f"workers stay at nice +{self.step}: lowering a nice value was refused (CAP_SYS_NICE or RLIMIT_NICE "
            "needed), so the two settings cannot be compared; worker_nice=0 keeps them level from the start"
        )
        return False

    def _settle(self, verdict: Verdict) -> None:
        chosen = 1 if verdict.choice == B else 0
        self.changed = self.chosen is not None and chosen != self.chosen
        again = " again: later blocks overturned the earlier verdict" if self.changed else ""
        self.chosen = chosen
        self._set(chosen)
        shown = f"+{self.step}: {verdict.rates[0]:.2f} batches/s, level: {verdict.rates[1]:.2f} batches/s"
        if chosen == 1:
            self.decision = (
                f"workers level with the training step (nice +0){again}: the loop ran {verdict.gain:.2f}x faster "
                f"with them level (+-{verdict.margin:.0%} over {verdict.blocks} blocks; {shown}); they are on its "
                f"critical path. worker_nice={self.step} steps them back"
            )
        else:
            self.decision = (
                f"workers stepped back to nice +{self.step}{again}, the training step first: level they were "
                f"{verdict.why} ({shown}). worker_nice=0 keeps them level"
            )
