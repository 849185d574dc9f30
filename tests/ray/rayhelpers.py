"""What the Ray tests share: reference streams, digests, and checks that a loader left nothing behind."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from typing import Any

import numpy as np
from helpers import hash_into

import prefetch


def digest(batch: Any) -> str:
    """A SHA-256 of a batch's structure, dtypes, shapes and bytes (``helpers.hash_into``)."""
    h = hashlib.sha256()
    hash_into(h, batch)
    return h.hexdigest()


def digests(batches: list[Any]) -> list[str]:
    return [digest(batch) for batch in batches]


def processes_stream(*sources: Any, **options: Any) -> list[Any]:
    """The same loader's stream (every epoch) from the processes executor."""
    options.setdefault("workers", 2)
    options.setdefault("start_method", "forkserver")  # Ray runs threads in this process: no fork
    with prefetch.Loader(*sources, **options) as loader:
        return list(loader.stream())


def gated(transform: Any, directory: str, batch_size: int = 0, count: int = 0) -> Any:
    """``transform``, held in every process that runs it until ``directory`` holds a file ``open``
    (``Opener``). With ``count``: a process then makes its first batch (``batch_size`` samples), leaves a
    file ``made-<pid>``, and waits before its next sample until ``count`` processes have left one. A
    closure: Ray pickles it by value, and each actor unpickles its own count."""
    made = [0]  # samples this process has transformed

    def held(sample: Any) -> Any:
        if made[0] == 0:
            _wait_for(lambda: os.path.exists(os.path.join(directory, "open")))
        made[0] += 1
        if count and made[0] == batch_size:
            open(os.path.join(directory, f"made-{os.getpid()}"), "w").close()
        elif count and made[0] == batch_size + 1:
            _wait_for(lambda: sum(name.startswith("made-") for name in os.listdir(directory)) >= count)
        return transform(sample)

    return held


def _wait_for(condition: Any) -> None:
    while not condition():
        time.sleep(0.005)


class Opener(threading.Thread):
    """Opens ``gated``'s gate in ``directory`` once ``condition()`` holds (``reached``), or after
    ``timeout_s`` anyway (``reached`` stays False), so that a test fails rather than hangs."""

    def __init__(self, condition: Any, directory: str, timeout_s: float):
        super().__init__(daemon=True)
        self.condition, self.directory, self.timeout_s = condition, directory, timeout_s
        self.reached = False
        self.start()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and not self.reached:
            self.reached = self.condition()
            time.sleep(0.01)
        open(os.path.join(self.directory, "open"), "w").close()


class Boom(Exception):
    """A user error of a class of its own."""


def augment(sample: Any) -> Any:
    """Draws from ``random``, ``np.random`` and ``prefetch.batch_rng()``."""
    x, y = sample
    noise = random.random() + np.random.rand() + prefetch.batch_rng().random()
    return x * np.float32(noise), y


def batch_noise(batch: Any) -> Any:
    x, y = batch
    return x + np.random.randint(0, 100), y


def slow(seconds: float):
    """A transform that takes ``seconds`` per sample (a closure: Ray pickles it by value)."""

    def transform(sample: Any) -> Any:
        time.sleep(seconds)
        return sample

    return transform


def fail_at(index: int):
    def transform(sample: Any) -> Any:
        if int(sample[1]) == index:
            raise Boom(f"sample {index} is bad")
        return sample

    return transform


def owned_objects() -> set[str]:
    """The objects this process holds a reference to (Ray's reference table of this driver): an
    object nobody references is unpinned and freed."""
    import ray

    counts = ray._private.worker.global_worker.core_worker.get_all_reference_counts()
    return {object_id.hex() if hasattr(object_id, "hex") else str(object_id) for object_id in counts}


def alive_actors() -> list[str]:
    """The loader actors (``BatchMaker``) Ray's own actor table (the GCS) lists as alive."""
    import ray

    table = ray._private.state.actors().values()
    return [a["ActorID"] for a in table if a.get("ActorClassName", "").endswith("BatchMaker") and a["State"] == "ALIVE"]


def run_with_own_ray(args: list[str], timeout_s: float) -> tuple[int, str, str]:
    """Run ``args`` (a command that starts and stops a Ray instance of its own: the doctor, the example)
    from the repository root, on loopback; its exit code, output and errors. Ray leaves the session
    directory of a driver behind: it is removed."""
    import glob
    import os
    import shutil
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
    try:
        out, err = process.communicate(timeout=timeout_s)
    finally:
        for path in glob.glob(f"/tmp/ray/session_*_{process.pid}"):
            shutil.rmtree(path, ignore_errors=True)
    return process.returncode, out, err
