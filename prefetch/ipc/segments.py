"""Segments: the files in the shm directory that shared memory lives in, and who owns them.

A *segment* is a file in ``SHM_DIR`` (``/dev/shm`` on Linux, a tmpfs) that several processes map.
This module makes, opens and unlinks them, and keeps track of whose they are, so that nothing is
left behind however a process ends. Invariants (``docs/design.md``, "Shutdown"):

* every segment of one owner is named ``prefetch-<owner pid>-<token>-...``, so cleanup never needs
  a list: whoever shuts down last unlinks the prefix (``unlink_prefix``);
* the owner holds an exclusive ``flock`` on ``<prefix>lock`` while it lives (``PrefixLock``, taken
  by ``claim_prefix`` before any segment exists), and the lock file is unlinked last; a later owner
  removes the prefixes whose lock it can take, i.e. whose owner died (``remove_stale_segments``),
  which works across PID namespaces, where a pid says nothing;
* segments are allocated with ``posix_fallocate``, so a full ``/dev/shm`` fails at once with
  ``ENOSPC`` (and the caller's fix) instead of a ``SIGBUS`` later.

Spill files (``write_file_segment`` / ``read_file_segment``) are segments too, under the same prefix.
What is *in* a segment is the business of ``slots`` and ``handles``.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from typing import Any, NamedTuple

import numpy as np
import psutil


class SegmentRef(NamedTuple):
    """A segment: its file name in the shm directory and its size in bytes."""

    name: str
    size: int


def _shm_dir() -> str:
    if os.path.isdir("/dev/shm"):
        return "/dev/shm"
    import tempfile  # not on Linux: the temporary directory (imported only there: it costs an import time)

    return tempfile.gettempdir()


SHM_DIR = _shm_dir()
NAME_ROOT = "prefetch-"
PAGE_BYTES = mmap.PAGESIZE


def align(n: int, to: int) -> int:
    """``n`` rounded up to a multiple of ``to``."""
    return (n + to - 1) // to * to


def buffer_address(buffer: Any) -> int:
    """The memory address of the first byte of ``buffer`` (a mapping, a memoryview, ...)."""
    return int(np.frombuffer(buffer, np.uint8).ctypes.data)


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def create_segment(name: str, size: int, purpose: tuple[str, str]) -> mmap.mmap:
    """Create segment ``name`` of ``size`` bytes (reserved now: ``ENOSPC`` here, not SIGBUS later).
    ``purpose`` is ``(what it holds, the fix)``, for the error when there is no room."""
    fd = os.open(_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.unlink(_path(name))
            what, fix = purpose
            raise OSError(
                exc.errno, f"cannot reserve {size / 2**20:.1f} MiB in {SHM_DIR} for {what} ({exc.strerror}); {fix}"
            ) from exc
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def open_segment(ref: SegmentRef) -> mmap.mmap:
    fd = os.open(_path(ref.name), os.O_RDWR)
    try:
        return mmap.mmap(fd, ref.size)
    finally:
        os.close(fd)


def unlink_segment(name: str) -> None:
    try:
        os.unlink(_path(name))
    except FileNotFoundError:
        pass


def new_prefix(token: str) -> str:
    return f"{NAME_ROOT}{os.getpid()}-{token}-"


# The file, beside a prefix's segments, whose flock says that their owner is alive.
LOCK_NAME = "lock"
# How many fresh tokens ``claim_prefix`` tries before it gives up (each try fails only if a
# sweep in another process took the brand-new lock file in the instant before its flock).
CLAIM_ATTEMPTS = 16


class PrefixLock:
    """The owner's claim on a prefix: an exclusive ``flock`` on ``<prefix>lock`` in the shm directory.

    A process ID says nothing across PID namespaces (two containers sharing ``/dev/shm``), but
    a lock does: the kernel holds it for the owner's open file, whatever namespace either side
    is in, and drops it when the owner dies, however it dies. ``remove_stale_segments`` removes a
    prefix's segments only once it can take the lock itself. Processes forked while the lock is
    held (the coordinator and workers under fork) share it, so it lasts while any of them lives.
    """

    def __init__(self, prefix: str, fd: int):
        self.prefix = prefix
        self._fd: int | None = fd
        self._owner_pid = os.getpid()

    def release(self) -> None:
        """Unlink every segment of the prefix, then the lock file, then drop the lock. Idempotent.
        In a process forked from the owner (which has a copy of this object) it only closes that
        process's copy of the descriptor: the segments are the owner's."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if os.getpid() == self._owner_pid:
                unlink_prefix(self.prefix)  # the lock file last: the segments are never left unclaimed
        finally:
            os.close(fd)

    def __del__(self) -> None:  # an engine that failed while starting: release what it had
        if getattr(self, "_fd", None) is not None:
            self.release()


def _is_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a sweep may have unlinked it)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)


def claim_prefix() -> PrefixLock:
    """A fresh prefix for this process's segments, with its lock taken (before any segment exists)."""
    for _ in range(CLAIM_ATTEMPTS):
        prefix = new_prefix(os.urandom(4).hex())  # a fresh token (os.urandom: no import of secrets)
        path = _path(prefix + LOCK_NAME)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except FileExistsError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            claimed = _is_file(fd, path)
        except BlockingIOError:  # a sweep holds it for a moment: it will remove it
            claimed = False
        if claimed:
            return PrefixLock(prefix, fd)
        os.close(fd)
    raise OSError(f"could not create a lock file for shared memory in {SHM_DIR}")


def unlink_prefix(prefix: str) -> int:
    """Unlink every segment whose name starts with ``prefix`` (its lock file last); return how many."""
    lock = prefix + LOCK_NAME
    names = sorted((name for name in os.listdir(SHM_DIR) if name.startswith(prefix)), key=lambda name: name == lock)
    for name in names:
        unlink_segment(name)
    return len(names)


def _owner_prefix(name: str) -> tuple[str, str] | None:
    """``(prefix, pid)`` of a segment name ``prefetch-<pid>-<token>-...``; None for other names."""
    parts = name[len(NAME_ROOT) :].split("-", 2)
    if not name.startswith(NAME_ROOT) or len(parts) < 3 or not parts[0].isdigit():
        return None
    return f"{NAME_ROOT}{parts[0]}-{parts[1]}-", parts[0]


def _remove_if_orphaned(prefix: str) -> bool:
    """Remove every segment of ``prefix`` if its lock can be taken (its owner died); True if it was.
    A lock file that vanished meanwhile means its owner is removing its segments itself."""
    try:
        fd = os.open(_path(prefix + LOCK_NAME), os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:  # held until the segments and the lock file are gone, so that no other sweep races this one
        unlink_prefix(prefix)
    finally:
        os.close(fd)
    return True


def remove_stale_segments() -> int:
    """Unlink segments left by owners that are gone (a consumer killed with SIGKILL, ...); return how many owners.

    A prefix with a lock file is removed only when its lock can be taken (``PrefixLock``), which
    works across PID namespaces. A prefix without one (left by an older version, or whose owner is
    removing it right now) is removed when no process of its pid is visible here.
    """
    prefixes: dict[str, str] = {}
    for name in os.listdir(SHM_DIR):
        owner = _owner_prefix(name)
        if owner is not None:
            prefixes[owner[0]] = owner[1]
    removed = 0
    for prefix, pid in prefixes.items():
        if os.path.exists(_path(prefix + LOCK_NAME)):
            if _remove_if_orphaned(prefix):
                removed += 1
        elif not psutil.pid_exists(int(pid)):
            unlink_prefix(prefix)
            removed += 1
    return removed


# --- spill files: messages too large for one atomic pipe write (see channel) ---------------------


def write_file_segment(name: str, data: bytes) -> SegmentRef:
    with open(_path(name), "xb") as file:
        file.write(data)
    return SegmentRef(name, len(data))


def read_file_segment(ref: SegmentRef) -> bytes:
    with open(_path(ref.name), "rb") as file:
        data = file.read()
    unlink_segment(ref.name)
    return data
