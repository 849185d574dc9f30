"""The end-to-end benchmarks' figures (``bench/e2e_figures.py``): rounds, paired per-round ratios, steady state.

The bench directory is not a package; the module is loaded from its file (it needs the standard library only).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "e2e_figures.py"
    spec = importlib.util.spec_from_file_location("bench_e2e_figures", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


figures = _load()


def test_rounds_default_quick_and_explicit() -> None:
    assert figures.bench_rounds({}) == 5
    assert figures.bench_rounds({"BENCH_QUICK": "1"}) == 1
    assert figures.bench_rounds({"BENCH_QUICK": "0"}) == 5
    assert figures.bench_rounds({"BENCH_ROUNDS": "7"}) == 7
    assert figures.bench_rounds({"BENCH_ROUNDS": "3", "BENCH_QUICK": "1"}) == 3  # explicit rounds win
    with pytest.raises(ValueError, match="at least 1"):
        figures.bench_rounds({"BENCH_ROUNDS": "0"})


def test_paired_ratios_are_per_round_and_their_median_is_not_the_ratio_of_medians() -> None:
    # round 2 ran on a slow machine for both systems: the pairing cancels it, the medians do not
    runs = [{"r": 300.0}, {"r": 100.0}, {"r": 210.0}]
    base = [{"r": 100.0}, {"r": 40.0}, {"r": 150.0}]
    ratios = figures.paired_ratios(runs, base, "r")
    assert ratios == [3.0, 2.5, 1.4]
    assert figures.paired_ratio(runs, base, "r") == 2.5  # the ratio of the medians is 210 / 100
    with pytest.raises(ValueError, match="not the same rounds"):
        figures.paired_ratios(runs, base[:2], "r")


def test_format_ratios_inverts_times() -> None:
    assert figures.format_ratios([2.0, 0.5]) == "2.00 0.50"
    assert figures.format_ratios([0.5, 0.25], invert=True) == "2.00 4.00"


def test_comparison_cells_for_a_time_say_faster_above_one() -> None:
    plain = [{"s": 4.0}, {"s": 6.0}, {"s": 5.0}]
    fast = [{"s": 2.0, "decided_at_batch": 40}, {"s": 2.0, "decided_at_batch": 41}, {"s": 2.5, "decided_at_batch": 40}]
    cells = figures.comparison_cells(fast, {"plain": plain}, "s", invert=True)
    assert cells["per round vs plain"] == "2.00 3.00 2.00"
    assert cells["paired vs plain"] == "2.00x"
    assert cells["decided after batch"] == "40 41 40"
    assert cells["batches to steady"] == "- - -"  # no per-batch times recorded (an older checkout)


def test_rolling_medians() -> None:
    assert figures.rolling_medians([1, 5, 3, 2], 2) == [3, 4, 2.5]
    assert figures.rolling_medians([1, 2], 3) == []


def test_steady_state_after_a_slow_start() -> None:
    # 15 slow batches (a pipeline filling, a tuner trying a bad setting), then 30 at the steady pace
    times = [1.0] * 15 + [0.5] * 30
    # windows starting at 0..9 hold at least 6 slow batches (median 1.0); at 10 five slow, five fast: 0.75;
    # from 11 on the median is 0.5
    assert figures.steady_state_batch(times, tail=20, window=10) == 11


def test_steady_state_counts_from_the_last_excursion() -> None:
    # settled early, then a long excursion (a second tuning phase): the steady state starts after it
    times = [0.5] * 20 + [2.0] * 12 + [0.5] * 30
    steady = figures.steady_state_batch(times, tail=20, window=10)
    assert steady == 20 + 12 - 10 // 2 + 1  # the first window with at most 4 of the 12 slow batches


def test_steady_state_of_a_flat_run_is_zero_and_within_tolerance_counts() -> None:
    assert figures.steady_state_batch([0.5] * 30, tail=20) == 0
    # 8 % slower at the start is within the 10 % tolerance, 12 % is not
    assert figures.steady_state_batch([0.54] * 15 + [0.5] * 20, tail=20, tolerance=0.10) == 0
    assert figures.steady_state_batch([0.56] * 15 + [0.5] * 20, tail=20, tolerance=0.10) == 10


def test_steady_state_none_when_the_run_never_settles_or_is_too_short() -> None:
    # the timed tail is half fast, half slow (median 0.6): the last window, all slow, is not within 10 % of it
    slowing = [0.2] * 30 + [1.0] * 10
    assert figures.steady_state_batch(slowing, tail=20, window=10) is None
    assert figures.steady_state_batch([0.5] * 5, tail=20) is None


def test_steady_cells_and_their_summary_over_rounds() -> None:
    runs = [
        {"batch_s": [0.1] * 60, "steady_batches": 12},
        {"batch_s": [0.1] * 60, "steady_batches": 8},
        {"batch_s": [0.1] * 60, "steady_batches": 10},
    ]
    assert figures.median_steady(runs) == "10 (8-12)"
    assert figures.median_steady(runs[:1]) == "12"
    unsettled = [*runs[:2], {"batch_s": [0.1] * 60, "steady_batches": None}]
    assert figures.median_steady(unsettled) == "12 8 >60"
