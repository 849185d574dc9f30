"""``doctor`` with PyTorch loaded: the training threads and the workers, weighed against the cores.

An integration test (it needs torch, which the default test environment does not install).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

CORES_SCRIPT = """
import json, os, sys
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])  # two cores, whatever the machine has
import numpy as np
import prefetch
def finding(loader=None):
    found = [f for f in prefetch.doctor(loader).findings if f.what.startswith("cores:")]
    assert len(found) == 1, found
    return [found[0].level, found[0].what, found[0].fix]
out = {"before_torch": finding()}
import torch
torch.set_num_threads(2)
data = np.zeros((8, 2))
out["defaults"] = finding(prefetch.Loader(data, batch_size=2, workers=2))
out["opted_out"] = finding(prefetch.Loader(data, batch_size=2, workers=2, worker_nice=0, train_threads=None))
out["fits"] = finding(prefetch.Loader(data, batch_size=2, workers=1, train_threads=1))
out["threads_after"] = torch.get_num_threads()
print(json.dumps(out))
"""


def test_doctor_weighs_the_training_threads_against_the_cores_when_torch_is_loaded():
    pytest.importorskip("torch")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("MKL_NUM_THREADS", None)
    done = subprocess.run(
        [sys.executable, "-c", CORES_SCRIPT], capture_output=True, text=True, timeout=120, cwd="/", env=env
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])

    level, what, _ = found["before_torch"]  # never imports torch itself: the threads are unknown
    assert level == "ok" and "PyTorch is not imported" in what and "cores: 2 usable" in what

    level, what, fix = found["defaults"]
    assert level == "warn"
    assert "cores: 2 usable" in what and "PyTorch imported with 2 intra-op threads" in what
    assert "OMP_NUM_THREADS=2" in what and "2 workers" in what and "worker_nice=10" in what
    assert "train_threads='auto'" in what and "2 training threads + 2 workers > 2 cores" in what and "compete" in what
    assert fix.startswith("the defaults account for it") and "nice +10" in fix
    assert "torch.set_num_threads(1)" in fix and "workers=1" in fix

    level, what, fix = found["opted_out"]  # without the defaults, the fix is to take them back
    assert level == "warn" and "worker_nice=0" in what and "train_threads=None" in what
    assert "keep the default worker_nice=10" in fix and "train_threads='auto'" in fix
    assert not fix.startswith("the defaults account for it")

    level, what, _ = found["fits"]  # train_threads=1 is the step's thread count while the loader runs
    assert level == "ok" and "1 training thread + 1 worker fit the cores" in what

    assert found["threads_after"] == 2  # looking changed nothing
