"""``cache=``: where ``load``'s results are kept, so that later epochs skip it (``docs/design.md``, "Decode once").

``open_cache(config)`` gives the loader's configuration its store (``LoaderConfig.store``, the seam that
``core.pipeline`` calls): a ``MemoryStore`` (``cache="memory"``: files in the shm directory under a prefix
of the loader's own, removed by ``close``) or a ``DirectoryStore`` (``cache=<dir>``: files on a disk,
checked against the manifest first, ``identity``). The store is a value that travels to every process.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from ..core.config import LoaderConfig
from ..ipc.segments import SHM_DIR, PrefixLock, claim_prefix
from .identity import MANIFEST, fingerprint, prepare
from .store import FileStore

__all__ = ["DirectoryStore", "MemoryStore", "open_cache"]


class MemoryStore(FileStore):
    """``cache="memory"``: entries are segments of a prefix the loader owns (``ipc.segments.PrefixLock``):
    its ``close`` unlinks them, and the stale sweep removes them if the loader's process dies."""

    def __init__(self, lock: PrefixLock, budget_bytes: int | None):
        super().__init__(SHM_DIR, lock.prefix + "cache-", budget_bytes)
        self._lock: PrefixLock | None = lock

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_lock"] = None  # the owner's; other processes open the entries by name
        return state

    def close(self) -> None:
        """Unlink every entry (in the owning process; elsewhere only its copy of the lock is let go)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()


class DirectoryStore(FileStore):
    """``cache=<dir>``: entries in a directory whose manifest names the sources and ``load`` they came from.

    The loader prepares the directory at construction; each other process checks the manifest once,
    before its first read, and prepares it if it is missing or another's (a Ray actor on another node,
    a directory removed meanwhile)."""

    def __init__(self, directory: str, budget_bytes: int | None, manifest: dict[str, Any]):
        super().__init__(directory, "", budget_bytes)
        self.manifest = manifest
        self._checked_pid = os.getpid()

    def get(self, index: int) -> tuple[bool, Any]:
        if self._checked_pid != os.getpid():
            prepare(self, self.manifest, tidy=False)
            self._checked_pid = os.getpid()
        return super().get(index)

    def close(self) -> None:
        """Nothing to free: the directory is kept for the next run."""


def open_cache(config: LoaderConfig) -> LoaderConfig:
    """``config`` with its store, or as it is without ``cache=``; a ``cache=<dir>`` made for other sources or
    another ``load`` is emptied first (``identity.prepare``)."""
    if config.cache is None:
        return config
    if config.cache != "memory" and os.path.exists(config.cache) and not os.path.isdir(config.cache):
        raise ValueError(f"cache={config.cache!r} is a file: pass a directory (made if missing) or 'memory'")
    store: MemoryStore | DirectoryStore
    if config.cache == "memory":
        store = MemoryStore(claim_prefix(), config.cache_bytes)
    else:
        store = DirectoryStore(config.cache, config.cache_bytes, fingerprint(config.sources, config.load))
        prepare(store, store.manifest, tidy=True)
    return replace(config, store=store)


def manifest_path(directory: str) -> str:
    """Where a cache directory's manifest is (for tests and ``doctor``)."""
    return os.path.join(directory, MANIFEST)
