"""The examples that need nothing beyond prefetch run, finish, and print what they promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Each example finishes in seconds on a quiet machine; the limit only catches a hang, so it is far above that:
# on a shared 2-core machine at a load of 8, profile_pipeline.py (12 loaders, ~8,800 heavy samples) took over 45 s.
EXAMPLE_TIMEOUT_S = 150
pytestmark = pytest.mark.timeout(EXAMPLE_TIMEOUT_S + 30)  # pytest's own limit above it


def run_example(name: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
        env={**os.environ, "PYTHONWARNINGS": "error::ResourceWarning"},
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def epoch_losses(output: str) -> list[float]:
    return [float(loss) for loss in re.findall(r"epoch \d+: mean loss ([0-9.]+)", output)]


def test_out_of_core_files_trains_from_files():
    output = run_example("out_of_core_files.py")
    assert "wrote 3000 files" in output
    losses = epoch_losses(output)
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert "15000 samples read from disk" in output


def test_resume_continues_exactly():
    output = run_example("resume.py")
    assert "resumed stream == uninterrupted stream: OK" in output


def test_profile_pipeline_prints_a_sweep_and_a_recommendation():
    output = run_example("profile_pipeline.py")
    rows = [line.split() for line in output.splitlines() if re.match(r"\s+\d+\s+[0-9.]+\s", line)]
    assert [row[0] for row in rows] == ["0", "1", "2", "4"]
    assert re.match(r"\d+ workers?", output.splitlines()[-1])  # the recommendation
