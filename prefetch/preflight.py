"""The pre-flight checks: what a loader's configuration needs from this machine, found before a batch is made.

Each check returns a ``Finding`` (``ok``, ``warn`` or ``error``, with what was found and how
to fix it); ``prefetch.doctor`` reports them all, and ``preflight(config)`` is the cheap part
that runs automatically whenever a loader starts its processes (``ProcessExecutor.start``):

* **/dev/shm space.** Batches live in shared-memory segments there: a loader needs
  ``prefetch`` batches' worth (and up to ``LoaderConfig.max_slots`` when the user keeps batches
  alive; ``LoaderConfig.shm_bytes_needed`` has both). Docker gives containers 64 MB by default;
  too little space is a ``SIGBUS`` or ``ENOSPC`` later, so it is better to fail at once with the
  fix (``--shm-size``): ``preflight`` raises ``ShmSpaceError`` when the batch size is known exactly.
  With spawn/forkserver the numpy sources are copied there too (``processes/spawn.py``): a copy
  that cannot fit is an error whatever the transforms do, naming the copy, its size and the fixes.
* **Open-files limit.** The engine's pipes, and each slot a process maps, against
  ``RLIMIT_NOFILE``.
* **Threads before fork.** ``fork`` copies only the calling thread: a lock another thread holds
  at that moment (logging, a thread pool, a library's internals) stays locked forever in the
  child. The coordinator is forked from your process with ``start_method="fork"`` (and
  ``background``'s producer by default). ``fork_hazard`` counts the process's OS threads
  (``/proc/self/task``) and says which may hold such a lock: every other Python thread, and the
  native threads of a runtime known to leave a forked process hanging (``FORK_UNSAFE_RUNTIMES``).
  Native threads alone are not a warning: numpy's BLAS pool runs in every program and survives a
  fork, and torch's is made safe where the engine forks (``ipc.lifetime.one_torch_thread``) -- except in
  workers with ``limit_threads=False``, where it is warned about.
* **Large Python-object sources.** Workers are forked (from the coordinator), so they share the
  source's pages -- until they read the objects: reference counting writes to every object
  touched, and each worker ends up with its own copy of a list of Python objects
  (copy-on-read). A numpy array has one buffer and no per-item objects: it stays shared.

``preflight`` warns (``PrefetchWarning``, at the user's line: ``errors.warn``) about everything but a
certain lack of ``/dev/shm``. It makes a few system calls: well under a millisecond. See
``docs/design.md`` ("Failures": before it starts).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ShmSpaceError, warn
from .ipc.lifetime import fork_hazard, fork_unsafe_runtimes, fork_warning

if TYPE_CHECKING:
    from .core.config import LoaderConfig

# A list or tuple source longer than this, under fork, warns about copy-on-read growth.
LARGE_OBJECT_SOURCE_ITEMS = 100_000
# Below this much /dev/shm in all (Docker's default is 64 MB), warn even without a loader.
SMALL_SHM_BYTES = 1 << 30
# Descriptors a process of the engine holds besides slots and per-worker pipes
# (its own pipes, epoll, spill files in flight, the interpreter's).
BASE_FDS = 16
# Warn when the engine's estimated descriptors exceed this share of the soft limit.
FD_SHARE_WARN = 0.5
# What to do when /dev/shm cannot hold the copy of a numpy source a spawned coordinator gets.
SOURCE_COPY_FIX = (
    "np.memmap the source from a file (it is then reopened, not copied), give /dev/shm more room (Docker: "
    '--shm-size), or start_method="fork" (the sources are then inherited, never copied)'
)


@dataclass(frozen=True)
class Finding:
    """One result of the check: ``level`` is ``"ok"``, ``"warn"`` or ``"error"``."""

    level: str
    what: str
    fix: str = ""


# --- estimates ----------------------------------------------------------------------------------


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def shm_dir() -> str:
    from .ipc.segments import SHM_DIR

    return SHM_DIR


def shm_space(path: str | None = None) -> tuple[int, int]:
    """``(free, total)`` bytes of the shared-memory file system."""
    stat = os.statvfs(path or shm_dir())
    return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize


def effective_start_method(config: LoaderConfig | None = None) -> str:
    """How the coordinator is started: the loader's ``start_method``, or the platform default."""
    if config is not None and config.start_method is not None:
        return config.start_method
    import multiprocess  # the engine's own multiprocessing; imported by then anyway

    return str(multiprocess.get_context().get_start_method())


def workers_fork() -> bool:
    """Workers are forked from the coordinator wherever fork exists, whatever the start method."""
    import multiprocess

    return "fork" in multiprocess.get_all_start_methods()


def engine_fds(config: LoaderConfig) -> int:
    """A conservative estimate of the descriptors the busiest process of the engine holds: every slot
    it may map (counted as if each kept a descriptor), a task pipe and a sentinel per worker (the
    coordinator; forked workers inherit them), and a fixed base."""
    return config.max_slots + 2 * config.workers + BASE_FDS


def nofile_limit() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def large_object_sources(config: LoaderConfig) -> list[tuple[int, int]]:
    """``(position, length)`` of list/tuple sources long enough for copy-on-read growth to matter."""
    return [
        (position, len(source))
        for position, source in enumerate(config.sources)
        if isinstance(source, (list, tuple)) and len(source) > LARGE_OBJECT_SOURCE_ITEMS
    ]


# --- the checks -----------------------------------------------------------------------------------


def check_shm(config: LoaderConfig | None) -> Finding:
    path = shm_dir()
    try:
        free, total = shm_space(path)
    except OSError as exc:
        return Finding("warn", f"{path}: cannot read its free space ({exc})", "make sure it is mounted")
    docker = "Docker: docker run --shm-size=2g (Compose: shm_size: 2g); Kubernetes: an emptyDir with medium: Memory"
    if config is None:
        if total < SMALL_SHM_BYTES:
            return Finding(
                "warn",
                f"{path} is small: {_mib(total)} in all, {_mib(free)} free (Docker's default is 64 MB)",
                f"give it more room: {docker}",
            )
        return Finding("ok", f"{path}: {_mib(free)} free of {_mib(total)}")
    one = config.batch_bytes()
    if one is None:
        return Finding("ok", f"{path}: {_mib(free)} free (batch size unknown: the sources are not numpy arrays)")
    slots, copies = config.shm_bytes_needed(one), spawn_copy_bytes(config)
    need, most = slots.window + copies, slots.most + copies
    sized = f"prefetch={config.prefetch} batches of ~{_mib(one)}"
    if copies:
        copied = _copies_text(config, copies)
        if free < copies:  # certain, whatever the transforms do
            return Finding("error", f"{path} has {_mib(free)} free, but {copied}", SOURCE_COPY_FIX)
        sized += f" ({_mib(slots.window)}) and {copied}: in all they"
    if free < need:
        level = "error" if config.exact_batch_size else "warn"
        return Finding(
            level,
            f"{path} has {_mib(free)} free, but {sized} need {_mib(need)}",
            f"free space in {path}, lower prefetch or batch_size, or give it more room ({docker})",
        )
    if free < most:
        return Finding(
            "warn",
            f"{path} has {_mib(free)} free: enough for {sized} ({_mib(need)}), not for the {config.max_slots} slots "
            f"({_mib(most)}) a loop that keeps batches alive may use",
            f"give it more room ({docker}), or lower prefetch",
        )
    return Finding("ok", f"{path}: {_mib(free)} free, {sized} need {_mib(need)}")


def _copies_text(config: LoaderConfig, copies: int) -> str:
    """Which sources a spawned coordinator copies into /dev/shm, and how much that is."""
    import numpy as np

    sizes = ", ".join(
        f"source {i}: {_mib(s.nbytes)}"
        for i, s in enumerate(config.sources)
        if isinstance(s, np.ndarray) and not isinstance(s, np.memmap) and not s.dtype.hasobject
    )
    method = effective_start_method(config)
    return f"the copy of the data set that start_method={method!r} makes there needs {_mib(copies)} ({sizes})"


def spawn_copy_bytes(config: LoaderConfig) -> int:
    """Numpy sources are copied into one segment each when the coordinator is not forked."""
    import numpy as np

    if effective_start_method(config) == "fork":
        return 0
    return sum(
        s.nbytes
        for s in config.sources
        if isinstance(s, np.ndarray) and not isinstance(s, np.memmap) and not s.dtype.hasobject
    )


def check_fds(config: LoaderConfig | None) -> Finding:
    limit = nofile_limit()
    if limit is None:
        return Finding("ok", "open files: no limit")
    if config is None:
        if limit < 1024:
            return Finding("warn", f"open files: the soft limit is {limit}", "raise it: ulimit -n 4096")
        return Finding("ok", f"open files: soft limit {limit}")
    need = engine_fds(config)
    if need > FD_SHARE_WARN * limit:
        return Finding(
            "warn",
            f"open files: the engine may hold ~{need} descriptors per process (workers={config.workers}, "
            f"{config.max_slots} slots), more than half the soft limit of {limit}",
            f"raise the limit (ulimit -n {max(4 * need, 4096)}), or lower workers / prefetch",
        )
    return Finding("ok", f"open files: ~{need} of the soft limit {limit}")


def check_threads(config: LoaderConfig | None) -> Finding:
    method = effective_start_method(config)
    torch_in_child = config is not None and not config.limit_threads
    hazard = fork_hazard(torch_in_child)
    if hazard is None:
        return Finding("ok", f"threads: none that a fork could leave holding a lock (start method: {method})")
    if method != "fork":
        return Finding("ok", f"threads: {hazard}; start method {method!r} does not fork them")
    return Finding(
        "warn",
        fork_warning(hazard, "the coordinator"),
        'pass start_method="forkserver" (or "spawn"): the coordinator then starts in a fresh process, every epoch',
    )


def check_sources(config: LoaderConfig) -> Finding:
    large = large_object_sources(config)
    if not large or not workers_fork():
        return Finding("ok", "sources: no large list or tuple of Python objects")
    shown = ", ".join(f"source {i} ({type(config.sources[i]).__name__} of {n:,})" for i, n in large)
    return Finding(
        "warn",
        f"sources: {shown} of Python objects: forked workers copy the pages of every object they read "
        "(reference counts are writes), so memory grows by up to a copy of the data per worker",
        "pass a numpy array instead (np.asarray(items), or np.stack for arrays), or a np.memmap of a file",
    )


# --- the automatic check ----------------------------------------------------------------------------


def preflight(config: LoaderConfig) -> None:
    """The cheap check run whenever a loader starts its processes (see the module docstring).

    Raises ``ShmSpaceError`` when ``/dev/shm`` cannot hold ``prefetch`` batches of a size known
    exactly; warns with ``PrefetchWarning`` otherwise, at the user's ``for`` loop (``errors.warn``)."""
    if config.workers == 0:
        return
    findings: list[Finding] = []
    if config.batch_bytes() is not None:
        findings.append(check_shm(config))
    limit = nofile_limit()
    if limit is not None and engine_fds(config) > FD_SHARE_WARN * limit:
        findings.append(check_fds(config))
    if threading.active_count() > 1 or fork_unsafe_runtimes(not config.limit_threads):
        findings.append(check_threads(config))
    if large_object_sources(config):
        findings.append(check_sources(config))
    for finding in findings:
        if finding.level == "error":
            raise ShmSpaceError(f"{finding.what}; {finding.fix}")
    for finding in findings:
        if finding.level == "warn":
            warn(f"{finding.what}; {finding.fix}")
