"""The Keras and PyTorch examples run, finish, and show the loss going down."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# A limit that only catches a hang (as in tests/engine/test_examples.py): far above a quiet machine's seconds.
EXAMPLE_TIMEOUT_S = 150
pytestmark = [pytest.mark.integration, pytest.mark.timeout(EXAMPLE_TIMEOUT_S + 30)]


def run_example(name: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
        env={**os.environ, "KERAS_BACKEND": "torch"},
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_keras_fit_example():
    pytest.importorskip("keras")
    output = run_example("keras_fit.py")
    first, last = map(float, re.search(r"loss: first epoch ([0-9.]+) -> last epoch ([0-9.]+)", output).groups())
    assert last < first
    assert "data_stall" in output and "data stall per epoch" in output


def test_torch_loop_example():
    pytest.importorskip("torch")
    output = run_example("torch_loop.py")
    losses = [float(loss) for loss in re.findall(r"epoch \d: mean loss ([0-9.]+)", output)]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert "waiting for data" in output  # loader.stats() printed
