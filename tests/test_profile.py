"""prefetch.profile: the worker sweep and its recommendation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import prefetch
from prefetch.profile import SweepRow, recommend


def make_loader(workers: int) -> prefetch.Loader:
    return prefetch.Loader(np.arange(400.0).reshape(200, 2), batch_size=8, workers=workers, transform=np.sqrt)


def test_profile_measures_every_worker_count():
    report = prefetch.profile(make_loader, workers=[0, 2], batches=10, warmup=2, progress=False)
    assert [row.workers for row in report.rows] == [0, 2]
    for row in report.rows:
        assert row.batches_per_s > 0 and row.samples_per_s == row.batches_per_s * 8
        assert 0.0 <= row.wait_fraction <= 1.0 and row.memory_mb > 0
    assert report.rows[1].worker_busy > 0.0
    assert "workers:" in report.recommendation and "workers" in str(report)
    assert report.to_dict()["rows"][0]["workers"] == 0


def _row(workers: int, samples_per_s: float, wait: float = 0.5, busy: float = 0.5) -> SweepRow:
    return SweepRow(workers, samples_per_s / 8, samples_per_s, wait, busy, 100.0)


def test_recommendation_picks_the_fewest_workers_that_are_as_fast():
    rows = [_row(1, 100), _row(2, 190), _row(4, 310), _row(8, 315)]
    line = recommend(rows, stepped=False)
    assert line.startswith("4 workers: 3.1x over 1") and "more workers do not help" in line


def test_recommendation_says_when_the_step_is_the_bottleneck():
    rows = [_row(1, 100, wait=0.02), _row(2, 101, wait=0.01)]
    assert "training step is the bottleneck" in recommend(rows, stepped=True)


def test_profile_command_line(tmp_path):
    (tmp_path / "pipeline_for_cli.py").write_text(
        "import numpy as np, prefetch\n"
        "def make(workers):\n"
        "    return prefetch.Loader(np.arange(100.0), batch_size=4, workers=workers)\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "prefetch", "profile", "pipeline_for_cli:make", "--workers", "0,1", "--batches", "5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "batches/s" in out.stdout and "workers:" in out.stdout
