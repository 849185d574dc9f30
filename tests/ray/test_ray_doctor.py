"""``python -m prefetch doctor --ray`` starts a local instance of its own, checks it, and stops it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from rayhelpers import run_with_own_ray

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parent.parent.parent


def test_doctor_checks_a_ray_setup(ray_instances):
    pytest.importorskip("ray")
    ray_instances.shutdown()  # the doctor starts (and stops) its own instance
    code, out, err = run_with_own_ray([sys.executable, "-m", "prefetch", "doctor", "--ray"], timeout_s=100)
    assert code == 0, out + err
    assert "Ray cluster: 1 node(s) at 127.0.0.1" in out
    assert "round trip through an actor" in out and "[error" not in out
