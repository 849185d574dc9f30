"""``python -m prefetch doctor --ray`` starts a local instance of its own, checks it, and stops it."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parent.parent.parent


def test_doctor_checks_a_ray_setup(ray_instances):
    pytest.importorskip("ray")
    ray_instances.shutdown()  # the doctor starts (and stops) its own instance
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "prefetch", "doctor", "--ray"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, cwd=str(ROOT),
    )  # fmt: skip
    try:
        out, err = process.communicate(timeout=100)
    finally:
        for path in glob.glob(f"/tmp/ray/session_*_{process.pid}"):  # its session directory: Ray leaves it
            shutil.rmtree(path, ignore_errors=True)
    assert process.returncode == 0, out + err
    assert "Ray cluster: 1 node(s) at 127.0.0.1" in out
    assert "round trip through an actor" in out and "[error" not in out
