"""The figures of the end-to-end comparisons, from the runs' results: pure functions, standard library only.

``e2e.compare`` gives, per system, one result per round (``dict``, as ``e2e.py run`` prints it). This module
turns them into what the reports show: the paired per-round ratios (each system against a baseline *within the
same round*, so that a machine whose speed drifts between rounds hurts both sides alike) and where each run's
per-batch time reaches its steady state. ``tests/unit/test_bench_figures.py`` checks them; nothing here starts
a process or reads the clock.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from typing import Any

# Rounds of an end-to-end comparison: the "at least 5"; one in a smoke run (``BENCH_QUICK=1``).
DEFAULT_ROUNDS = 5
QUICK_ROUNDS = 1
# Steady state: a rolling median over this many batches must stay within this share of the run's final
# median. 10 batches smooth out the odd slow batch (a worker's page fault, an epoch end) without hiding a
# start-up that lasts longer; 10 % is above the batch-to-batch noise of a quiet 2-core machine and below
# the effect of a wrong thread setting or a pipeline still filling.
STEADY_WINDOW_BATCHES = 10
STEADY_TOLERANCE = 0.10


def bench_rounds(environ: dict[str, str] | None = None) -> int:
    """Rounds of an end-to-end comparison: ``BENCH_ROUNDS`` if set, else 1 under ``BENCH_QUICK``, else 5."""
    env = os.environ if environ is None else environ
    if env.get("BENCH_ROUNDS"):
        rounds = int(env["BENCH_ROUNDS"])
        if rounds < 1:
            raise ValueError(f"BENCH_ROUNDS={rounds}: at least 1 round")
        return rounds
    return QUICK_ROUNDS if env.get("BENCH_QUICK", "") not in ("", "0") else DEFAULT_ROUNDS


def paired_ratios(runs: Sequence[dict[str, Any]], base: Sequence[dict[str, Any]], key: str) -> list[float]:
    """``run[key] / base[key]`` for each round, in round order (the two lists must have one result per round)."""
    if len(runs) != len(base):
        raise ValueError(f"{len(runs)} runs against {len(base)} baseline runs: not the same rounds")
    return [a[key] / b[key] for a, b in zip(runs, base)]


def paired_ratio(runs: Sequence[dict[str, Any]], base: Sequence[dict[str, Any]], key: str) -> float:
    """The median over rounds of ``paired_ratios``: on a machine whose speed drifts between rounds, systems
    compared inside a round say more than a ratio of medians does."""
    return statistics.median(paired_ratios(runs, base, key))


def format_ratios(ratios: Sequence[float], invert: bool = False) -> str:
    """The per-round ratios as the reports list them (``1.52 1.61 1.40``); ``invert`` for times (base / run)."""
    return " ".join(f"{(1 / r if invert else r):.2f}" for r in ratios)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def rolling_medians(times: Sequence[float], window: int) -> list[float]:
    """The median of each ``window`` consecutive values: element ``j`` covers ``times[j : j + window]``."""
    return [statistics.median(times[j : j + window]) for j in range(len(times) - window + 1)]


def steady_state_batch(
    times: Sequence[float],
    tail: int,
    window: int = STEADY_WINDOW_BATCHES,
    tolerance: float = STEADY_TOLERANCE,
) -> int | None:
    """How many batches a run takes before its steady state, from its per-batch times (``times[0]``: from
    constructing the loader to the end of the first batch's step); None if it never settles.

    Definition: the final median is the median of the last ``tail`` batches (the timed ones); the steady state
    starts at the first batch ``k`` such that the rolling median of ``window`` batches starting at ``k`` *and at
    every later batch* is within ``tolerance`` of the final median. ``k`` is the number of batches before it.
    """
    if window < 1 or tail < 1 or len(times) < max(window, tail):
        return None
    final = statistics.median(times[-tail:])
    settled = None
    for j, median in enumerate(rolling_medians(times, window)):
        if abs(median - final) <= tolerance * final:
            if settled is None:
                settled = j
        else:
            settled = None
    return settled


def steady_cell(run: dict[str, Any]) -> str:
    """A run's batches before steady state as a table cell: ``12``; ``>60`` when it never settled within the
    run's ``batches``; ``-`` when the run did not record per-batch times (an older checkout)."""
    if "batch_s" not in run:
        return "-"
    steady = run.get("steady_batches")
    return str(steady) if steady is not None else f">{len(run['batch_s'])}"


def median_steady(runs: Sequence[dict[str, Any]]) -> str:
    """Batches before steady state over the rounds: the median, and the range when the rounds differ."""
    cells = [steady_cell(run) for run in runs]
    numbers = sorted(int(c) for c in cells if c.isdigit())
    if len(numbers) < len(cells):  # some never settled, or were not recorded: show every round
        return " ".join(cells)
    low, high = numbers[0], numbers[-1]
    middle = statistics.median(numbers)
    return f"{middle:g}" if low == high else f"{middle:g} ({low}-{high})"


def decided_cell(runs: Sequence[dict[str, Any]]) -> str:
    """After which batch prefetch's decisions last changed (its tuner's choice of training threads), per round;
    ``-`` for a system that decides nothing."""
    found = [run["decided_at_batch"] for run in runs if "decided_at_batch" in run]
    return " ".join(map(str, found)) if found else "-"


def comparison_cells(
    runs: Sequence[dict[str, Any]],
    references: dict[str, Sequence[dict[str, Any]]],
    key: str,
    invert: bool = False,
) -> dict[str, str]:
    """A system's table cells against each reference system of the same rounds: the median of the paired
    per-round ratios and every round's ratio (``invert`` for a time, where the faster has the smaller value:
    the ratios are then base / run, so > 1 still means faster), then the batches before steady state and
    the batch after which prefetch last decided something."""
    cells = {}
    for name, base in references.items():
        ratios = paired_ratios(runs, base, key)
        middle = statistics.median(ratios)
        cells[f"paired vs {name}"] = f"{(1 / middle if invert else middle):.2f}x"
        cells[f"per round vs {name}"] = format_ratios(ratios, invert)
    cells["batches to steady"] = median_steady(runs)
    cells["decided after batch"] = decided_cell(runs)
    return cells
