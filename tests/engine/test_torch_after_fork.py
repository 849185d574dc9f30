"""PyTorch in a forked process after the consumer ran torch's thread pool: a worker's transform and a
``background`` producer run torch operations without hanging.

Once a process has run torch's OpenMP pool (GNU libgomp), a process forked from it hangs on its first
parallel operation unless torch is set to one thread there (``lifetime.one_torch_thread``; measured with
torch 2.13: threadpoolctl's OpenMP limit is not enough, torch re-applies its own setting). Each case runs
in a consumer process of its own, so that the test process never imports torch.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from helpers import run_script

# A consumer that has run torch's pool, then forks: a Loader's coordinator and workers, or a producer.
TORCH_AFTER_ITS_POOL_RAN = """
import sys
import numpy as np
import torch
import prefetch

torch.set_num_threads(2)
weights = torch.randn(800, 800)
(weights @ weights).sum()  # the pool's threads are up in the consumer
torch.sin(torch.randn(1_000_000))


def with_torch(value):
    return value + float((torch.randn(800, 800) @ weights).sum()) * 0.0  # a parallel operation, then value


def torch_items():
    for i in range(3):
        yield with_torch(float(i))


if __name__ == "__main__":
    if sys.argv[1] == "loader":
        options = dict(batch_size=4, epochs=1, shuffle=False, workers=1, start_method="fork", timeout=15)
        with prefetch.Loader(np.arange(8.0), transform=with_torch, **options) as loader:
            print([batch.tolist() for batch in loader.stream()], flush=True)
    else:
        print(list(prefetch.background(torch_items())), flush=True)
"""

EXPECTED = {"loader": "[[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]", "background": "[0.0, 1.0, 2.0]"}
# Imports, start-up and a few operations take a few seconds; a hang takes forever.
RUN_WITHIN_S = 60


@pytest.mark.timeout(90)
@pytest.mark.parametrize("forked", ["loader", "background"])
def test_torch_runs_in_a_process_forked_after_its_pool_ran(tmp_path, forked):
    pytest.importorskip("torch")
    process = run_script(tmp_path, "consumer.py", TORCH_AFTER_ITS_POOL_RAN, forked)
    try:
        out, err = process.communicate(timeout=RUN_WITHIN_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the consumer and what it forked: a hung process ignores SIGTERM
        process.communicate()
        pytest.fail(f"the {forked}'s forked process hung in torch")
    assert process.returncode == 0, err
    assert out.strip() == EXPECTED[forked]
