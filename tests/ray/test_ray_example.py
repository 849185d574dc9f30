"""``examples/ray_cluster.py`` runs on a local Ray instance of its own and says the streams match."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from rayhelpers import run_with_own_ray

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent.parent


def test_ray_cluster_example(ray_instances):
    pytest.importorskip("ray")
    ray_instances.shutdown()  # the example starts (and stops) its own instance
    code, out, err = run_with_own_ray([sys.executable, str(ROOT / "examples" / "ray_cluster.py")], timeout_s=150)
    assert code == 0, err
    made = re.search(r"made by (\d+) of 8 actors on 1 node\(s\)", out)  # the actors up make the batches
    assert made and 1 <= int(made.group(1)) <= 8, out
    assert "ray stream == processes stream: OK" in out
