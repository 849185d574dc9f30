"""prefetch.profile over real loaders: the sweep of worker counts and the command line (the recommendation
from measured rows: tests/unit/test_profile.py)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import cpu_heavy

import prefetch
from prefetch.profile import recommend


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
    assert report.recommendation == recommend(report.rows, stepped=False)
    assert re.match(
        r"\d+ workers?: \d+ samples/s \(best of 3, range \d+-\d+\)|\d+ workers?, .*too noisy",
        str(report).splitlines()[-1],
    )
    assert report.to_dict()["rows"][0]["workers"] == 0 and len(report.to_dict()["rows"][0]["rounds"]) == 3


def test_without_a_step_the_report_says_it_measures_the_loader_alone():
    report = prefetch.profile(make_loader, workers=[1], batches=5, warmup=1, rounds=1, progress=False)
    text = str(report)
    assert not report.stepped
    header = text.splitlines()[0].split()
    assert "waiting" in header and "stall" not in header
    assert "measures the loader alone" in text and "not a stall" in text
    assert "bottleneck, data keeps up" not in text


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
    assert "batches/s" in out.stdout and "measures the loader alone" in out.stdout
    assert re.match(r"\d+ workers?[:,] ", out.stdout.splitlines()[-1])
