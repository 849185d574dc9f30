"""One /dev/shm shared by PID namespaces (issue 10): two containers with ``--ipc=host``, or pods
sharing a volume, see each other's segments but not each other's processes. The stale-segment
sweep must tell a live owner by its lock, not by its pid: a loader in another PID namespace keeps
its segments while this one sweeps, and a crashed owner's segments (and lock file) are still swept.

The other namespace is made with ``unshare --pid --fork --mount-proc`` (root); the loader in it is
given a pid that does not exist here, so a pid-based sweep would take it for dead.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import psutil
import pytest
from helpers import wait_until

import prefetch
from prefetch.ipc.segments import LOCK_NAME, NAME_ROOT, SHM_DIR, claim_prefix, remove_stale_segments

# Runs as pid 1 of the new namespace: makes the next pid there the one the test chose, then runs the loader.
LAUNCHER = """
import subprocess, sys
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(sys.argv[1])
sys.exit(subprocess.call(sys.argv[2:]))
"""

LOADER_SCRIPT = """
import os, sys
import numpy as np
import prefetch

if __name__ == "__main__":
    data = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    loader = prefetch.Loader(data, batch_size=8, seed=1, shuffle=False, workers=1, start_method=sys.argv[1])
    batches = loader.stream()
    first = next(batches)
    print("ready", os.getpid(), flush=True)
    sys.stdin.readline()  # the test sweeps /dev/shm meanwhile
    total = sum(float(next(batches).sum()) for _ in range(23))  # batches 1-23: three passes over the data
    assert total == 3 * float(data.sum()) - float(first.sum()), total
    print("done", flush=True)
    loader.close()
"""

# Runs in the test's PID namespace, in a mount namespace of its own whose /dev/shm is a fresh tmpfs (so
# that sweeps by other loaders on this machine cannot interfere): starts the loader in a new PID
# namespace, which shares that /dev/shm, plays the scenario and prints what it saw as JSON.
SCENARIO = """
import json, os, random, subprocess, sys, time
import psutil
from helpers import alive, wait_until
from prefetch.ipc.segments import NAME_ROOT, SHM_DIR, remove_stale_segments

mode, start_method, launcher, script = sys.argv[1:5]

def names_of(pid):
    return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(f"{NAME_ROOT}{pid}-"))

with open("/proc/sys/kernel/pid_max") as file:
    pid_max = int(file.read())
pid = random.randrange(min(100_000, pid_max // 2), pid_max - 1)
while psutil.pid_exists(pid):
    pid = random.randrange(min(100_000, pid_max // 2), pid_max - 1)
command = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable, "-c", launcher]
command += [str(pid - 1), sys.executable, script, start_method]
process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
report = {"pid": pid, "ready": process.stdout.readline().split(), "pid_visible_here": psutil.pid_exists(pid)}
report["before"] = names_of(pid)
if mode == "live":
    remove_stale_segments()
    report["after_sweep"] = names_of(pid)
    process.stdin.write("\\n")
    process.stdin.flush()
    report["loader_went_on"] = process.stdout.readline().strip()
    report["exit_code"] = process.wait(timeout=20)
    report["after_close"] = names_of(pid)
else:
    namespace = psutil.Process(process.pid).children(recursive=True)
    process.kill()  # --kill-child: the namespace's pid 1 gets SIGKILL, and with it every process there
    process.wait()
    wait_until(lambda: not any(alive(p.pid) for p in namespace), timeout_s=10)
    report["after_crash"] = names_of(pid)
    started = time.monotonic()
    remove_stale_segments()
    report["sweep_s"] = time.monotonic() - started
    report["after_sweep"] = names_of(pid)
print(json.dumps(report))
"""

needs_unshare = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and util-linux unshare"
)


def free_pid() -> int:
    """A pid no process has here."""
    with open("/proc/sys/kernel/pid_max") as file:
        pid_max = int(file.read())
    while True:
        pid = random.randrange(min(100_000, pid_max // 2), pid_max - 1)
        if not psutil.pid_exists(pid):
            return pid


def names_of(pid: int) -> list[str]:
    return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(f"{NAME_ROOT}{pid}-"))


def play(tmp_path, mode: str, start_method: str) -> dict:
    """Run ``SCENARIO`` and return its report."""
    script = tmp_path / "loader_in_namespace.py"
    script.write_text(LOADER_SCRIPT)
    scenario = tmp_path / "scenario.py"
    scenario.write_text(SCENARIO)
    package = os.path.dirname(os.path.dirname(prefetch.__file__))
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where helpers.py is
    env = {**os.environ, "PYTHONPATH": f"{package}:{tests}"}
    private_shm = 'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$0" "$@"'
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", private_shm, sys.executable]
    command += [str(scenario), mode, start_method, LAUNCHER, str(script)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=50, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_unshare
def test_a_loader_in_another_pid_namespace_keeps_its_segments_during_a_sweep(tmp_path, start_method):
    report = play(tmp_path, "live", start_method)
    pid = report["pid"]
    assert report["ready"] == ["ready", str(pid)] and not report["pid_visible_here"]
    theirs = report["before"]
    assert f"{NAME_ROOT}{pid}-" in theirs[0] and any(name.endswith(f"-{LOCK_NAME}") for name in theirs)
    assert len(theirs) >= 2  # its lock file and at least one slot
    assert set(theirs) <= set(report["after_sweep"]), "a live loader's segments were swept"
    assert report["loader_went_on"] == "done" and report["exit_code"] == 0
    assert report["after_close"] == []  # its close() removed everything, the lock file too


@needs_unshare
def test_the_segments_of_a_crashed_owner_in_another_namespace_are_swept(tmp_path):
    report = play(tmp_path, "crash", "fork")
    left = report["after_crash"]
    assert any(name.endswith(f"-{LOCK_NAME}") for name in left) and len(left) >= 2  # nobody cleaned up
    assert report["after_sweep"] == [] and report["sweep_s"] < 2.0


def test_a_live_loader_here_keeps_its_segments_and_a_dead_lockless_owner_is_swept():
    dead = free_pid()
    legacy = os.path.join(SHM_DIR, f"{NAME_ROOT}{dead}-0ld0ld00-0-{dead}-0")  # left by an older version
    open(legacy, "wb").close()
    with prefetch.Loader(np.arange(32), batch_size=4, workers=1) as loader:
        batches = iter(loader)
        next(batches)
        mine = names_of(os.getpid())
        assert any(name.endswith(f"-{LOCK_NAME}") for name in mine)
        remove_stale_segments()
        assert set(mine) <= set(os.listdir(SHM_DIR)) and not os.path.exists(legacy)
        next(batches)
    assert names_of(os.getpid()) == []


def test_a_lock_whose_owner_is_gone_is_swept_with_its_segments(tmp_path, monkeypatch):
    """The owner is a forked child that claims a prefix, makes a segment and exits without cleaning up.
    It stays a zombie (not reaped) until the end, so its pid exists: only the lock can tell it is gone.
    In a directory of the test's own: any other loader on the machine sweeps /dev/shm too, and could
    take the dead owner's files before this test's sweep does."""
    shm_dir = str(tmp_path)
    monkeypatch.setattr(prefetch.ipc.segments, "SHM_DIR", shm_dir)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            lock = claim_prefix()
            open(os.path.join(shm_dir, lock.prefix + "0-1-0"), "wb").close()
            os.write(write_end, lock.prefix.encode())
        finally:
            os._exit(0)  # no cleanup: as if killed
    try:
        os.close(write_end)
        prefix = os.read(read_end, 200).decode()
        os.close(read_end)
        wait_until(lambda: psutil.Process(child).status() == psutil.STATUS_ZOMBIE, timeout_s=10)
        left = sorted(name for name in os.listdir(shm_dir) if name.startswith(prefix))
        assert left == [prefix + "0-1-0", prefix + LOCK_NAME]
        remove_stale_segments()
        assert not any(name.startswith(prefix) for name in os.listdir(shm_dir))
    finally:
        os.waitpid(child, 0)


def test_a_forked_child_dropping_its_copy_of_the_lock_leaves_the_owners_segments():
    lock = claim_prefix()
    segment = os.path.join(SHM_DIR, lock.prefix + "0-1-0")
    open(segment, "wb").close()
    try:
        child = os.fork()
        if child == 0:  # pragma: no cover - the child: what its interpreter's clean-up would do
            lock.release()
            os._exit(0)
        os.waitpid(child, 0)
        assert os.path.exists(segment) and os.path.exists(os.path.join(SHM_DIR, lock.prefix + LOCK_NAME))
        remove_stale_segments()  # the owner's lock is still held: nothing is swept
        assert os.path.exists(segment)
    finally:
        lock.release()
    assert not any(name.startswith(lock.prefix) for name in os.listdir(SHM_DIR))


# --- a data set copy that /dev/shm cannot hold ----------------------------------------------------------

COPY_SCENARIO = """
import json, os, sys, time
import numpy as np
import prefetch
from prefetch.ipc.segments import SHM_DIR
from prefetch.processes.spawn import share_sources

def scale(x):
    return x * 2

if __name__ == "__main__":
    data = np.zeros((20 * 1024, 1024), dtype=np.float32)  # 80 MiB, in a 64 MiB /dev/shm
    report = {}
    for name, options in [("plain", {}), ("transform", {"transform": scale})]:
        loader = prefetch.Loader(data, batch_size=8, workers=1, start_method="spawn", **options)
        started = time.monotonic()
        try:
            next(iter(loader))
            report[name] = {"error": None}
        except Exception as exc:
            report[name] = {"type": type(exc).__name__, "oserror": isinstance(exc, OSError), "text": str(exc)}
        report[name]["seconds"] = time.monotonic() - started
        loader.close()
        report[name]["left"] = sorted(os.listdir(SHM_DIR))
    try:  # the copy itself, past the pre-flight check (/dev/shm filled in between, say)
        share_sources((data,), "prefetch-0-test-")
        report["copy"] = {"error": None}
    except Exception as exc:
        report["copy"] = {"type": type(exc).__name__, "text": str(exc), "errno": getattr(exc, "errno", None)}
    report["copy"]["left"] = sorted(os.listdir(SHM_DIR))
    print(json.dumps(report))
"""


@needs_unshare
@pytest.mark.timeout(60)
def test_a_data_set_copy_that_does_not_fit_names_the_copy_its_size_and_the_fixes(tmp_path):
    script = tmp_path / "copy_scenario.py"
    script.write_text(COPY_SCENARIO)
    package = os.path.dirname(os.path.dirname(prefetch.__file__))
    env = {**os.environ, "PYTHONPATH": package}
    private_shm = 'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$0" "$@"'
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", private_shm, sys.executable, str(script)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=50, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for case in ("plain", "transform"):  # a transform cannot change the size of the copy: an error either way
        seen = report[case]
        assert seen.get("type") == "ShmSpaceError" and seen["oserror"], seen
        text = seen["text"]
        assert "copy of the data set" in text and "'spawn'" in text and "source 0: 80.0 MiB" in text, text
        assert "np.memmap" in text and "--shm-size" in text and 'start_method="fork"' in text, text
        assert seen["seconds"] < 1.0 and seen["left"] == [], seen  # before any process or segment
    copy = report["copy"]
    assert copy["type"] == "ShmSpaceError" and copy["errno"] == errno.ENOSPC, copy
    assert "cannot reserve 80.0 MiB" in copy["text"] and "copy of the data set" in copy["text"], copy
    assert "source 0" in copy["text"] and "np.memmap" in copy["text"] and "--shm-size" in copy["text"], copy
    assert copy["left"] == [], copy
