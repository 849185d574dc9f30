"""``examples/ray_cluster.py`` runs on a local Ray instance of its own and says the streams match."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent.parent


def test_ray_cluster_example(ray_instances):
    pytest.importorskip("ray")
    ray_instances.shutdown()  # the example starts (and stops) its own instance
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "ray_cluster.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        out, err = process.communicate(timeout=150)
    finally:
        for path in glob.glob(f"/tmp/ray/session_*_{process.pid}"):  # its session directory: Ray leaves it
            shutil.rmtree(path, ignore_errors=True)
    assert process.returncode == 0, err
    assert "from 8 actors on 1 node(s)" in out
    assert "ray stream == processes stream: OK" in out
