"""prefetch.profile: the worker sweep and its recommendation."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from prefetch.profile import ProfileReport, SweepRow, choose, noisy, notes, recommend, shortfall

profile_module = importlib.import_module("prefetch.profile")  # (prefetch.profile is the function)


def _row(workers: int, samples_per_s: float, wait: float = 0.5, busy: float = 0.5, rounds=(), **cpu) -> SweepRow:
    return SweepRow(workers, samples_per_s / 8, samples_per_s, wait, busy, 100.0, tuple(rounds), **cpu)


def test_recommendation_picks_the_fewest_workers_that_are_as_fast():
    rows = [_row(1, 100), _row(2, 190), _row(4, 310), _row(8, 315)]
    line = recommend(rows, stepped=False)
    assert line.startswith("4 workers: 310 samples/s"), line
    assert "within 2% of 8 workers' 315, inside the noise of 5%" in line and "more workers gain nothing" in line
    assert "2 workers: 40% behind the fastest" in line


def test_recommendation_counts_within_the_noise_of_the_best_as_fast_and_says_the_margin():
    # 4 workers' best round is the fastest, but its two best rounds differ by 10 %: 2 workers is inside
    rows = [
        _row(1, 500, rounds=(480, 500, 520)),
        _row(2, 800, rounds=(780, 800, 870)),
        _row(4, 840, rounds=(760, 840, 930)),
    ]
    line = recommend(rows, stepped=False)
    assert line.startswith("2 workers: 870 samples/s (best of 3, range 780-870), within 6% of 4 workers' 930"), line
    assert "inside the noise of 10%" in line
    assert "1 worker: 44% behind the fastest" in line
    assert choose(rows).workers == 2
    assert noisy(rows) is None  # 4 workers' rounds are within 30 % of each other


def test_recommendation_compares_best_rounds_so_a_busy_spell_does_not_decide():
    # a busy spell slowed two of 4 workers' rounds: its best round still shows it is 20 % faster
    rows = [_row(2, 800, rounds=(800, 790, 805)), _row(4, 800, rounds=(1000, 800, 780))]
    assert shortfall(rows[0], rows[1]) == pytest.approx(1 - 805 / 1000)
    assert noisy(rows) is None and choose(rows).workers == 4


def test_a_sweep_too_noisy_to_choose_by_keeps_the_default_and_says_why(monkeypatch):
    monkeypatch.setattr(profile_module, "process_cpus", lambda: 2)
    # other processes took the CPU for much of the sweep: rounds of one count differ 2.5x
    rows = [_row(0, 900, rounds=(1200, 900, 600)), _row(2, 800, rounds=(2000, 800, 1900)), _row(4, 9, rounds=(1100,))]
    assert noisy(rows) is not None and choose(rows).workers == 2
    line = recommend(rows, stepped=True)
    assert line.startswith("2 workers, the default (one per usable core): too noisy to choose by measurement")
    assert "the rounds of 2 workers ranged 800-2000 samples/s" in line and "load average" in line
    assert "0 workers 1200, 2 workers 2000, 4 workers 1100" in line and "quiet machine" in line
    monkeypatch.setattr(profile_module, "process_cpus", lambda: 3)
    assert recommend(rows, stepped=True).startswith("2 workers, nearest the default of 3")


def test_recommendation_is_stable_under_noise():
    # twenty sweeps of the same pipeline (2 and 4 workers equally fast, 1 worker 30 % slower): each
    # round is off by up to 3 %, and up to two of each count's three rounds are slowed by up to 25 %
    # more by other processes (one quiet round per count is all the best-round comparison needs).
    # Every sweep recommends the same count; the medians, compared as the sweep used to, do not.
    rng = np.random.default_rng(0)
    picks, by_median = set(), set()
    for _ in range(20):
        rows = []
        for workers, rate in [(1, 700.0), (2, 1000.0), (4, 1000.0)]:
            slowed = rng.uniform(0, 0.25, 3) * (rng.random(3) < 0.5)
            slowed[rng.integers(3)] = 0.0  # the quiet round
            rounds = tuple(rate * rng.uniform(0.97, 1.03, 3) * (1 - slowed))
            rows.append(_row(workers, float(np.median(rounds)), rounds=rounds))
        assert noisy(rows) is None
        picks.add(choose(rows).workers)
        fastest = max(row.samples_per_s for row in rows)
        by_median.add(min(row.workers for row in rows if row.samples_per_s >= 0.95 * fastest))
    assert picks == {2}
    assert len(by_median) > 1


def test_recommendation_says_when_the_step_is_the_bottleneck():
    rows = [_row(1, 100, wait=0.02), _row(2, 101, wait=0.01)]
    assert "training step is the bottleneck" in recommend(rows, stepped=True)


def test_a_stepped_sweep_reports_the_contention_at_the_recommended_count():
    competing = _row(2, 800, wait=0.05, busy=0.6, cores=2, consumer_cpu=1.1, workers_cpu=0.8, consumer_threads=5)
    assert notes(competing, stepped=True) == (f"at 2 workers, {competing.contention}",)
    assert "compete for 2 cores" in notes(competing, stepped=True)[0]
    quiet = _row(2, 800, wait=0.05, busy=0.3, cores=8, consumer_cpu=1.0, workers_cpu=0.6, consumer_threads=5)
    assert notes(quiet, stepped=True) == ()
    report = ProfileReport([competing], "2 workers: 800 samples/s", stepped=True, notes=notes(competing, True))
    text = str(report)
    assert "stall" in text.splitlines()[0].split() and "compete for 2 cores" in text
    assert text.splitlines()[-1] == "2 workers: 800 samples/s"  # the recommendation comes last
