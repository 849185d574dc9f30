"""The decode-once store: ``load``'s results kept in files, one per sample (``docs/design.md``, "Decode once").

A ``FileStore`` keeps the samples that ``load`` returned, pickled, one file per sample index, in a
directory: the shm directory for ``cache="memory"`` (the files are segments of the loader's prefix,
``ipc.segments``, so the loader's close and the stale sweep remove them), or the user's directory for
``cache=<dir>``. It is a plain value (paths and a byte budget): it travels to forked and spawned
processes and to Ray actors in the configuration, and every process opens the files by name.

Invariants:

* **nothing torn is ever read**: an entry is written to a temporary name of its writer and renamed into
  place when whole (``rename`` is atomic), so a worker killed mid-write leaves at most a temporary file,
  never an entry; the next read of that sample finds none and loads it again;
* **within the budget**: before an entry is written its bytes are reserved on a counter file under an
  exclusive ``flock`` (every process of the loader shares it); a sample that does not fit, or meets a full
  disk, is not kept, and is loaded again whenever it is needed;
* a directory is used only for the source and ``load`` its manifest names (``identity``, checked by
  ``prepare`` before any read).
"""

from __future__ import annotations

import errno
import fcntl
import os
import pickle
from collections.abc import Callable
from typing import Any

# The pickle protocol of an entry: 5 writes numpy arrays' bytes in one piece.
PICKLE_PROTOCOL = 5
ENTRY = "s"  # an entry's name: <prefix>s<index>
TEMPORARY = "t"  # a write in progress: <prefix>t<pid>-<index>
BUDGET = "budget"  # <prefix>budget: 8 bytes, the bytes reserved so far (little-endian)
COUNTER_BYTES = 8


class FileStore:
    """Samples by index, as files ``<directory>/<prefix>s<index>`` (the module docstring).

    ``budget_bytes`` is the most bytes of entries the store keeps (None: as many as the disk takes).
    ``get`` and ``put`` are ``core.config.SampleStore``'s: what ``core.pipeline`` calls per sample.
    """

    def __init__(self, directory: str, prefix: str, budget_bytes: int | None):
        self.directory = directory
        self.prefix = prefix
        self.budget_bytes = budget_bytes

    def __repr__(self) -> str:
        return f"FileStore({os.path.join(self.directory, self.prefix)!r}, budget_bytes={self.budget_bytes})"

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, self.prefix + name)

    def get(self, index: int) -> tuple[bool, Any]:
        """``(True, sample)`` if sample ``index`` is kept, else ``(False, None)``. An entry cut short (a machine
        that lost power before the disk had it: entries are not fsynced) fails to unpickle and is a miss."""
        path = self._path(f"{ENTRY}{index}")
        try:
            with open(path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return False, None
        try:
            return True, pickle.loads(data)
        except (pickle.UnpicklingError, EOFError, ValueError):
            _remove(path)
            return False, None

    def put(self, index: int, sample: Any) -> bool:
        """Keep ``sample`` as entry ``index`` if the budget and the disk have room; True if it was kept.

        A sample pickle cannot write raises ``TypeError`` naming ``load`` (its result is what is kept)."""
        try:
            data = pickle.dumps(sample, protocol=PICKLE_PROTOCOL)
        except Exception as exc:
            raise TypeError(
                f"cache= keeps what load returns, pickled, and this sample cannot be pickled ({exc}); "
                "make load return arrays, numbers, strings or containers of them, or leave cache out"
            ) from exc
        if not self._reserve(len(data)):
            return False
        temporary = self._path(f"{TEMPORARY}{os.getpid()}-{index}")
        try:
            with open(temporary, "wb") as file:
                file.write(data)
            os.rename(temporary, self._path(f"{ENTRY}{index}"))  # whole, or not there at all
        except OSError as exc:
            _remove(temporary)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return False  # a full disk: the sample is loaded again when needed
            raise
        return True

    def _reserve(self, size: int) -> bool:
        """Add ``size`` to the bytes reserved, if they stay within the budget (every process shares the counter)."""
        if self.budget_bytes is None:
            return True
        if size > self.budget_bytes:
            return False
        fd = os.open(self._path(BUDGET), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            used = int.from_bytes(os.pread(fd, COUNTER_BYTES, 0).ljust(COUNTER_BYTES, b"\0"), "little")
            if used + size > self.budget_bytes:
                return False
            os.pwrite(fd, (used + size).to_bytes(COUNTER_BYTES, "little"), 0)
            return True
        finally:
            os.close(fd)  # the lock goes with it

    def clear(self) -> None:
        """Remove every entry, write in progress and the budget counter (a directory being rebuilt)."""
        self._remove_names(lambda rest: rest == BUDGET or _is_entry(rest) or _is_temporary(rest))

    def remove_unfinished(self) -> None:
        """Remove the writes in progress left by processes killed mid-write (the entries stay)."""
        self._remove_names(_is_temporary)

    def _remove_names(self, chosen: Callable[[str], bool]) -> None:
        """Remove the files of this store whose name after the prefix is ``chosen`` (nothing else there)."""
        for name in os.listdir(self.directory):
            if name.startswith(self.prefix) and chosen(name[len(self.prefix) :]):
                _remove(os.path.join(self.directory, name))


def _is_entry(rest: str) -> bool:
    return rest[:1] == ENTRY and rest[1:].isdigit()


def _is_temporary(rest: str) -> bool:
    return rest[:1] == TEMPORARY and rest[1:].replace("-", "", 1).isdigit()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
