"""Injected faults for the conformance suite, each a transform of ``(x, label)`` samples that strikes at the sample
whose label is ``index``. Spawned workers and Ray actors import this module by name: it imports no torch,
so the fault tests' workers start without it.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

# The most seconds a fault keeps a worker busy when nothing ends it: a bound, never the expected path.
FAULT_HOLD_S = 30.0


class Boom(Exception):
    """A user error of a class of its own."""


class RaiseAt:
    """A transform that raises ``Boom`` at sample ``index``."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, sample: tuple[Any, Any]) -> tuple[Any, Any]:
        if int(sample[1]) == self.index:
            raise Boom(f"sample {self.index} is bad")
        return sample


class DieAt:
    """A transform that kills its own process at sample ``index``, every time (a poison sample). Before each
    kill it appends ``pid monotonic-seconds`` to the file ``deaths_path`` (one ``write``: whole lines), so a
    test can count the deaths and time what follows the last one (``deaths``)."""

    def __init__(self, index: int, deaths_path: str):
        self.index = index
        self.deaths_path = deaths_path

    def __call__(self, sample: tuple[Any, Any]) -> tuple[Any, Any]:
        if int(sample[1]) == self.index:
            line = f"{os.getpid()} {time.monotonic()!r}\n".encode()
            fd = os.open(self.deaths_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        return sample

    def deaths(self) -> list[tuple[int, float]]:
        """``(pid, time.monotonic() just before the kill)`` of each process it killed, in order (the clock
        is the machine's: comparable with this process's ``time.monotonic()``)."""
        if not os.path.exists(self.deaths_path):
            return []
        with open(self.deaths_path) as file:
            return [(int(pid), float(at)) for pid, at in (line.split() for line in file)]


class HangAt:
    """A transform that hangs at sample ``index`` for ``seconds``."""

    def __init__(self, index: int, seconds: float = FAULT_HOLD_S):
        self.index = index
        self.seconds = seconds

    def __call__(self, sample: tuple[Any, Any]) -> tuple[Any, Any]:
        if int(sample[1]) == self.index:
            time.sleep(self.seconds)
        return sample


class HoldOnce:
    """The transform ``then`` that, the first time it meets sample ``index`` in any process, writes its pid
    to the file ``pid_path`` and stays there (``FAULT_HOLD_S`` at most) to be killed mid-batch. The batch's
    redo goes through: the file is there by then."""

    def __init__(self, index: int, pid_path: str, then: Any):
        self.index = index
        self.pid_path = pid_path
        self.then = then

    def __call__(self, sample: tuple[Any, Any]) -> Any:
        if int(sample[1]) == self.index and not os.path.exists(self.pid_path):
            with open(self.pid_path + ".tmp", "w") as file:
                file.write(str(os.getpid()))
            os.rename(self.pid_path + ".tmp", self.pid_path)  # whole, or not there
            time.sleep(FAULT_HOLD_S)
        return self.then(sample)

    def pid(self) -> int | None:
        """The pid of the process holding the sample, once one does."""
        if not os.path.exists(self.pid_path):
            return None
        with open(self.pid_path) as file:
            return int(file.read())
