"""prefetch.profile: the worker sweep and its recommendation."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import cpu_heavy

import prefetch
from prefetch.profile import ProfileReport, SweepRow, choose, notes, recommend, shortfall


def make_loader(workers: int) -> prefetch.Loader:
    return prefetch.Loader(np.arange(400.0).reshape(200, 2), batch_size=8, workers=workers, transform=np.sqrt)


def test_profile_measures_every_worker_count_in_interleaved_rounds():
    asked = []

    def factory(workers: int) -> prefetch.Loader:  # 16 ms of CPU per batch: enough for the CPU clocks
        asked.append(workers)
        return prefetch.Loader(np.arange(400.0).reshape(200, 2), batch_size=8, workers=workers, transform=cpu_heavy)

    report = prefetch.profile(factory, workers=[0, 2], batches=10, warmup=2, rounds=3, progress=False)
    assert asked == [0, 2, 2, 0, 0, 2]  # forwards, backwards, forwards: drift favours no count
    assert [row.workers for row in report.rows] == [0, 2]
    for row in report.rows:
        assert len(row.rounds) == 3 and row.samples_per_s == sorted(row.rounds)[1]  # the median round
        assert row.samples_per_s_low <= row.samples_per_s <= row.samples_per_s_high
        assert row.batches_per_s > 0 and row.samples_per_s == pytest.approx(row.batches_per_s * 8)
        assert 0.0 <= row.wait_fraction <= 1.0 and row.memory_mb > 0 and row.cores >= 1
    assert report.rows[1].worker_busy > 0.0 and report.rows[1].workers_cpu > 0.0
    assert re.match(r"\d+ workers?: \d+ samples/s \(range \d+-\d+\)", report.recommendation)
    assert report.to_dict()["rows"][0]["workers"] == 0 and len(report.to_dict()["rows"][0]["rounds"]) == 3


def test_without_a_step_the_report_says_it_measures_the_loader_alone():
    report = prefetch.profile(make_loader, workers=[1], batches=5, warmup=1, rounds=1, progress=False)
    text = str(report)
    assert not report.stepped
    header = text.splitlines()[0].split()
    assert "waiting" in header and "stall" not in header
    assert "measures the loader alone" in text and "not a stall" in text
    assert "bottleneck, data keeps up" not in text


def _row(workers: int, samples_per_s: float, wait: float = 0.5, busy: float = 0.5, rounds=(), **cpu) -> SweepRow:
    return SweepRow(workers, samples_per_s / 8, samples_per_s, wait, busy, 100.0, tuple(rounds), **cpu)


def test_recommendation_picks_the_fewest_workers_that_are_as_fast():
    rows = [_row(1, 100), _row(2, 190), _row(4, 310), _row(8, 315)]
    line = recommend(rows, stepped=False)
    assert line.startswith("4 workers: 310 samples/s"), line
    assert "within 2% of 8 workers' 315," in line and "more workers gain nothing" in line
    assert "2 workers: 40% behind the fastest" in line


def test_recommendation_counts_within_the_noise_of_the_best_as_fast_and_says_the_margin():
    # 4 workers has the best median, but its rounds spread +-10 %: 2 workers is inside that noise
    rows = [
        _row(1, 500, rounds=(480, 500, 520)),
        _row(2, 800, rounds=(780, 800, 830)),
        _row(4, 840, rounds=(760, 840, 930)),
    ]
    line = recommend(rows, stepped=False)
    assert line.startswith("2 workers: 800 samples/s (range 780-830), within 5% of 4 workers' 840 (range 760-930)")
    assert "inside the noise of 10%" in line
    assert "1 worker: 40% behind the fastest" in line
    assert choose(rows).workers == 2


def test_recommendation_pairs_the_rounds_so_a_busier_machine_weighs_on_every_count():
    # the machine got busy in the third round: every count slowed by half. Paired round by round,
    # 2 workers is 20 % slower than 4 each time; its range alone would overlap 4 workers'
    rows = [_row(2, 800, rounds=(800, 800, 400)), _row(4, 1000, rounds=(1000, 1000, 500))]
    assert shortfall(rows[0], rows[1]) == pytest.approx(0.2)
    assert choose(rows).workers == 4


def test_recommendation_is_stable_under_noise():
    # ten sweeps of the same pipeline (2 and 4 workers equally fast, 1 worker 30 % slower), each
    # round off by up to +-6 %: every sweep recommends the same count
    rng = np.random.default_rng(0)
    picks = set()
    for _ in range(10):
        noise = rng.uniform(0.94, 1.06, size=(3, 3))
        rows = [
            _row(w, float(np.median(rate * noise[i])), rounds=tuple(rate * noise[i]))
            for i, (w, rate) in enumerate([(1, 700.0), (2, 1000.0), (4, 1000.0)])
        ]
        picks.add(choose(rows).workers)
    assert picks == {2}


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


def test_profile_command_line(tmp_path):
    (tmp_path / "pipeline_for_cli.py").write_text(
        "import numpy as np, prefetch\n"
        "def make(workers):\n"
        "    return prefetch.Loader(np.arange(100.0), batch_size=4, workers=workers)\n"
    )
    out = subprocess.run(
        [
            *(sys.executable, "-m", "prefetch", "profile", "pipeline_for_cli:make"),
            *("--workers", "0,1", "--batches", "5", "--rounds", "2"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "batches/s" in out.stdout and "workers:" in out.stdout and "measures the loader alone" in out.stdout
