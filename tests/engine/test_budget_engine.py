"""The defaults from the real budget, on this machine (issue 20, item 1): a loader started in a real cgroup
with a 1-CPU quota starts 1 worker; ``LOCAL_WORLD_SIZE=2`` gives each rank its half of the cores; a default
loader in a small ``/dev/shm`` (a tmpfs of its own) sizes its depth to fit and runs, where the per-worker depth
failed at start. The unit tests (``tests/unit/test_budget*.py``) cover the same rules on faked machines."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import fingerprint

import prefetch
from prefetch import _budget

PACKAGE = os.path.dirname(os.path.dirname(prefetch.__file__))
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where helpers.py is
MIB = 2**20

# --- a real cgroup with a CPU quota ---------------------------------------------------------------------------


class CpuGroup:
    """A cgroup of this machine's cpu controller (v1, or v2 where the cpu controller is delegated), made for a
    test: ``path``, the group a process is put in; ``home``, the group it came from."""

    def __init__(self, version: int, path: Path, home: Path, made: list[Path]):
        self.version, self.path, self.home, self.made = version, path, home, made

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        """Move whatever is still in the groups back home, then remove them, innermost first."""
        for group in reversed(self.made):
            for pid in (group / "cgroup.procs").read_text().split():
                try:
                    (self.home / "cgroup.procs").write_text(pid)
                except OSError as error:  # it has ended meanwhile
                    if error.errno != errno.ESRCH:
                        raise
            os.rmdir(group)


def make_cpu_group(name: str, cpus: float) -> CpuGroup:
    """``name`` under this process's cpu cgroup, with a quota of ``cpus`` CPUs, and a group ``inner`` below it
    without a quota of its own (a parent's quota limits too); skips the test if the cgroup file system is not
    writable, saying why."""
    version, directories = _budget.cgroup_dirs("cpu")
    if not directories:
        pytest.skip("no cgroup cpu controller is mounted (cannot make a group with a CPU quota)")
    home = Path(directories[0])
    if version == 2 and "cpu" not in (home / "cgroup.subtree_control").read_text().split():
        pytest.skip(f"the cgroup v2 cpu controller is not delegated below {home} (cgroup.subtree_control)")
    outer = home / name
    try:
        outer.mkdir()
    except OSError as error:
        pytest.skip(f"the cgroup file system is not writable here: mkdir {outer}: {error.strerror}")
    group = CpuGroup(version, outer / "inner", home, [outer])
    try:
        period_us = 100_000
        if version == 1:
            (outer / "cpu.cfs_period_us").write_text(str(period_us))
            (outer / "cpu.cfs_quota_us").write_text(str(int(cpus * period_us)))
        else:
            (outer / "cpu.max").write_text(f"{int(cpus * period_us)} {period_us}")
            (outer / "cgroup.subtree_control").write_text("+cpu")
        group.path.mkdir()
        group.made.append(group.path)
    except BaseException:
        group.remove()
        raise
    return group


@pytest.fixture
def one_cpu_group() -> Iterator[CpuGroup]:
    group = make_cpu_group(f"prefetch-test-{os.getpid()}", cpus=1.0)
    try:
        yield group
    finally:
        group.remove()


CHILD = """
import json, sys
import numpy as np
import prefetch
print("ready", flush=True)
sys.stdin.readline()  # the test has moved this process into the group
with prefetch.Loader(np.arange(64.0).reshape(32, 2), batch_size=4, seed=0) as loader:
    batches = loader.stream()
    next(batches)
    out = {
        "workers": loader.workers,
        "started": len(loader.engine.worker_pids()),
        "scaled": loader.engine.auto is not None,  # workers="auto" with one worker: nothing to measure
        "provenance": loader.config.provenance,
        "stats": str(loader.stats()),
    }
    batches.close()
print(json.dumps(out), flush=True)
"""


@pytest.mark.timeout(60)
def test_a_loader_in_a_cgroup_with_a_one_cpu_quota_starts_one_worker(one_cpu_group):
    env = {**os.environ, "PYTHONPATH": PACKAGE}
    env.pop("LOCAL_WORLD_SIZE", None)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        one_cpu_group.add(child.pid)  # the loader's processes, forked from it, are born in the group
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=50)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, err
    found = json.loads(out.strip().splitlines()[-1])
    cores = len(os.sched_getaffinity(0))
    assert found["workers"] == found["started"] == 1 <= cores and not found["scaled"]
    assert "cgroup CPU quota 1" in found["provenance"][0] and found["provenance"][0].startswith(
        "workers=auto, at most 1: "
    )
    assert re.search(r"^sized +" + re.escape(found["provenance"][0]) + "$", found["stats"], re.M)  # where from
    assert "of 1 usable" in found["stats"]  # the cores stats() weighs the loop and the workers against


def test_sizing_a_default_loader_imports_no_engine():
    """Reading the budget at construction must not import the engine (multiprocess and dill load slowly); the
    spawn checks a loader runs at construction (``processes.spawn``) stand on the IPC wing alone."""
    code = (
        "import sys, numpy as np, prefetch\n"
        "prefetch.Loader(np.zeros((8, 2)), batch_size=2)\n"
        "print(sorted(m for m in ('multiprocess', 'dill', 'prefetch.processes.run', 'prefetch.processes.coordinator')"
        " if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": PACKAGE},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- ranks on the node ----------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_local_world_size_2_starts_half_the_workers_per_rank(monkeypatch):
    cores = prefetch._budget.process_cpus()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with prefetch.Loader(np.arange(64.0), batch_size=4, seed=0) as loader:
        batches = loader.stream()
        next(batches)
        assert loader.engine is not None
        assert len(loader.engine.worker_pids()) == loader.workers == max(1, cores // 2)
        batches.close()


# --- a small /dev/shm -------------------------------------------------------------------------------------------

# Run in a mount namespace of its own whose /dev/shm is a 10 MiB tmpfs: a default loader over 2 MiB batches.
# The per-worker depth (3 per worker) would need 2 workers x 3 x 2 MiB = 12 MiB for its window alone.
SMALL_SHM = """
import hashlib, json, sys
import numpy as np
import prefetch
from helpers import fingerprint
data = np.arange(16 * 2**20, dtype=np.uint8).reshape(16, 2**20)  # a sample is 1 MiB, a batch of 2 is 2 MiB
out = {}
try:
    with prefetch.Loader(data, batch_size=2, seed=0, workers=2) as loader:
        out["prefetch"] = loader.prefetch
        out["max_slots"] = loader.config.max_slots
        out["provenance"] = loader.config.provenance
        batches = loader.stream()
        out["stream"] = hashlib.sha256(repr([fingerprint(next(batches)) for _ in range(24)]).encode()).hexdigest()
        batches.close()
except prefetch.ShmSpaceError as error:
    out["error"] = str(error)
print(json.dumps(out))
"""

needs_unshare = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and util-linux unshare"
)


@needs_unshare
@pytest.mark.timeout(60)
def test_a_default_loader_in_a_small_dev_shm_sizes_its_depth_to_fit_and_runs(tmp_path):
    script = tmp_path / "small_shm.py"
    script.write_text(SMALL_SHM)
    env = {**os.environ, "PYTHONPATH": f"{PACKAGE}:{TESTS}"}
    private_shm = 'mount -t tmpfs -o size=10m tmpfs /dev/shm && exec "$0" "$@"'
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", private_shm, sys.executable, str(script)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=50, env=env)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in found, found["error"]
    assert found["max_slots"] * 2 * MIB <= 10 * MIB  # every slot it may ever have fits
    assert found["prefetch"] < 6 and "/dev/shm has 10.0 MiB free" in found["provenance"][1]
    data = np.arange(16 * MIB, dtype=np.uint8).reshape(16, MIB)
    with prefetch.Loader(data, batch_size=2, seed=0, workers=0) as loader:  # the same stream, made in-process
        batches = loader.stream()
        expected = [fingerprint(next(batches)) for _ in range(24)]
        batches.close()
    import hashlib

    assert found["stream"] == hashlib.sha256(repr(expected).encode()).hexdigest()
