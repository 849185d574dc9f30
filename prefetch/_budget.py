"""The budget a loader's defaults are sized by: the CPUs this rank may use, the bytes its slots may fill.

Every default was once measured on one machine; this module reads the machine the loader runs on
instead (``docs/design.md``, *Defaults from the real budget*):

* **CPUs** (``cpu_budget``): the smaller of the affinity mask and the cgroup CPU quota -- v1
  ``cpu.cfs_quota_us / cpu.cfs_period_us``, v2 ``cpu.max``, the smallest over the process's cgroup and
  its parents, rounded up -- divided by the ranks that share this node (``local_ranks=``, else
  ``LOCAL_WORLD_SIZE``), at least 1. ``workers=None`` is that number.
* **Bytes** (``prefetch_ceiling``): the deepest ``prefetch`` whose most slots (``max_slots``, what a
  loop keeping batches alive may hold) fit in this rank's part of free ``/dev/shm`` and of half the
  available memory, once a batch's size can be told from the sources. ``prefetch=None`` is the
  per-worker default, never deeper than that.

This module reads the machine only and imports nothing of the package; ``validation`` applies the
ceiling to a configuration (``sizing``). The readers take the root they
read under (``root="/"``: ``proc/self/cgroup``, ``proc/self/mountinfo``, ``proc/meminfo`` and the
cgroup mount points under it), so tests pass fake trees. None raises: a file
that is missing, unreadable or malformed is no limit, as if the kernel had none to show. The sentences
``CpuBudget.describe`` and ``sizing.budget_prefetch`` write are the provenance ``stats()`` and ``doctor`` show.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

# The share of the available memory the slots of one rank's loader may fill at most, when all of them
# are in use: the training step, the model and the framework need the rest.
MEMORY_SHARE = 0.5
# The share of free /dev/shm for the same. All of it, because the ceiling counts ``max_slots`` (about
# twice the window, reached only when the loop keeps ``prefetch`` batches alive): a plain loop fills
# about half, and the pre-flight check then warns about nothing at the default depth.
SHM_SHARE = 1.0
# The environment variable torchrun sets to the ranks it starts on this node.
LOCAL_RANKS_VAR = "LOCAL_WORLD_SIZE"


# --- reading files ------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            return file.read()
    except (OSError, ValueError):  # missing, unreadable (permissions), a directory, ...
        return None


def _read_int(path: str) -> int | None:
    text = (_read(path) or "").strip()
    return int(text) if text.removeprefix("-").isdecimal() else None


def _under(root: str, path: str) -> str:
    """``path`` (absolute, as the kernel names it) inside the tree at ``root``."""
    return os.path.normpath(os.path.join(root, path.lstrip("/")))


# --- cgroups ------------------------------------------------------------------------------------


class Mount(NamedTuple):
    """One cgroup file system mount from ``/proc/self/mountinfo``."""

    root: str  # the cgroup the mount shows at its mount point
    point: str  # where it is mounted
    version: int  # 1 or 2
    controllers: frozenset[str]  # v1: the controllers of its hierarchy (its super options); v2: empty


def _unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline or backslash in a path as an octal escape (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def cgroup_mounts(root: str = "/") -> list[Mount]:
    """The cgroup (v1) and cgroup2 mounts this process sees."""
    mounts = []
    for line in (_read(_under(root, "proc/self/mountinfo")) or "").splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        if dash < 5 or len(fields) < dash + 4:
            continue
        fstype, options = fields[dash + 1], frozenset(fields[dash + 3].split(","))
        if fstype in ("cgroup", "cgroup2"):
            version = 1 if fstype == "cgroup" else 2
            mounts.append(
                Mount(_unescape(fields[3]), _unescape(fields[4]), version, options if version == 1 else frozenset())
            )
    return mounts


def cgroup_dirs(controller: str, root: str = "/") -> tuple[int, list[str]]:
    """``(version, directories)`` of this process's cgroup for ``controller``, innermost first, up to the
    mount point (a parent's limit limits too): the v1 hierarchy that has the controller if one is
    mounted, else the unified (v2) one; ``(0, [])`` when neither can be found."""
    memberships = []  # (controllers, path); v2's line is "0::/path"
    for line in (_read(_under(root, "proc/self/cgroup")) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            memberships.append((frozenset(parts[1].split(",")) - {""}, parts[2]))
    mounts = cgroup_mounts(root)
    for version in (1, 2):
        for controllers, path in memberships:
            if (version == 1 and controller not in controllers) or (version == 2 and controllers):
                continue
            for mount in mounts:
                if mount.version != version or (version == 1 and controller not in mount.controllers):
                    continue
                directories = _dirs_under(root, mount, path)
                if directories:
                    return version, directories
    return 0, []


def _dirs_under(root: str, mount: Mount, path: str) -> list[str]:
    """The directories from the cgroup ``path`` up to ``mount``'s point, or [] if the mount does not show it."""
    top = mount.root.rstrip("/")
    if top and path != top and not path.startswith(top + "/"):
        return []  # a mount of another part of the hierarchy
    relative = path[len(top) :].strip("/")
    if ".." in relative.split("/"):
        return []  # the cgroup lies outside this namespace's view
    point = _under(root, mount.point)
    directories = [os.path.join(point, relative) if relative else point]
    while directories[-1] != point:
        directories.append(os.path.dirname(directories[-1]))
    return directories


def _cpu_limit(version: int, directory: str) -> float | None:
    """The CPUs one cgroup's quota allows (quota / period), or None for no quota there."""
    if version == 1:
        quota = _read_int(os.path.join(directory, "cpu.cfs_quota_us"))
        period = _read_int(os.path.join(directory, "cpu.cfs_period_us"))
    else:
        fields = (_read(os.path.join(directory, "cpu.max")) or "").split()
        if len(fields) != 2 or fields[0] == "max":
            return None
        try:
            quota, period = int(fields[0]), int(fields[1])
        except ValueError:
            return None
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None  # -1 (v1) and "max" (v2): no quota
    return quota / period


def cgroup_cpu_quota(root: str = "/") -> float | None:
    """The CPUs this process's cgroup quota allows: the smallest over its cgroup and its parents (None: no quota)."""
    version, directories = cgroup_dirs("cpu", root)
    limits = [limit for limit in (_cpu_limit(version, d) for d in directories) if limit is not None]
    return min(limits) if limits else None


def _memory_room(version: int, directory: str, enough: int | None) -> int | None:
    """Bytes one cgroup may still take before its limit: the limit less what it uses, page cache that can be
    dropped (inactive files) counted as room. None for no limit there. ``memory.stat`` (costly to read) is
    read only when the room without it is below ``enough`` (what is available anyway)."""
    names = ("memory.limit_in_bytes", "memory.usage_in_bytes") if version == 1 else ("memory.max", "memory.current")
    limit, usage = (_read_int(os.path.join(directory, name)) for name in names)  # v2's "max": None
    if limit is None or usage is None:
        return None
    if enough is not None and limit - usage >= enough:
        return limit - usage
    key = "total_inactive_file" if version == 1 else "inactive_file"
    inactive = 0
    for line in (_read(os.path.join(directory, "memory.stat")) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdecimal():
            inactive = int(value)
    return max(0, limit - usage + inactive)


def available_memory(root: str = "/") -> int | None:
    """Bytes of memory this process may still take: ``MemAvailable``, or less where its memory cgroup (or a
    parent) is closer to its limit. None when neither can be read."""
    available = None
    for line in (_read(_under(root, "proc/meminfo")) or "").splitlines():
        fields = line.split()
        if fields[:1] == ["MemAvailable:"] and len(fields) >= 2 and fields[1].isdecimal():
            available = int(fields[1]) * 1024  # kB
    version, directories = cgroup_dirs("memory", root)
    rooms = [room for room in (_memory_room(version, d, available) for d in directories) if room is not None]
    figures = [figure for figure in (available, min(rooms) if rooms else None) if figure is not None]
    return min(figures) if figures else None


def shm_dir() -> str:
    """Where the slots live: ``ipc.segments.SHM_DIR``'s rule, without importing the engine (multiprocess)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def shm_free(path: str) -> int | None:
    """Free bytes of the file system at ``path`` (``/dev/shm``), or None when it cannot be read."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


# --- CPUs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    """The ranks sharing this node's CPUs and memory, and where the number came from."""

    count: int
    source: str  # "local_ranks=8", "LOCAL_WORLD_SIZE=8", "LOCAL_WORLD_SIZE unset"
    ignored: str | None = None  # a LOCAL_WORLD_SIZE that is not an int >= 1, as found (then ``count`` is 1)


def local_ranks(given: int | None, environ: Mapping[str, str] | None = None) -> Ranks:
    """``given`` (the ``local_ranks`` option), else ``LOCAL_WORLD_SIZE`` from ``environ``, else 1."""
    if given is not None:
        return Ranks(given, f"local_ranks={given}")
    raw = (os.environ if environ is None else environ).get(LOCAL_RANKS_VAR)
    if raw is None:
        return Ranks(1, f"{LOCAL_RANKS_VAR} unset")
    count = int(raw) if raw.strip().isdecimal() else 0
    if count < 1:
        return Ranks(1, f"{LOCAL_RANKS_VAR}={raw!r} ignored", ignored=raw)
    return Ranks(count, f"{LOCAL_RANKS_VAR}={count}")


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (all of the machine's where there is no such mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs this process and this rank may use, and the figures they come from."""

    affinity: int  # CPUs in the affinity mask
    quota: float | None  # CPUs the cgroup quota allows (None: no quota)
    machine: int  # the machine's CPUs (``os.cpu_count``)
    ranks: Ranks

    @property
    def process_cpus(self) -> int:
        """The CPUs this process may use: the affinity mask, or the quota rounded up if that is fewer. Up: a
        quota is CPU time per period, not cores -- 1.5 CPUs of time keep two processes busy most of the time
        (and the workers' nice lets the step go first within it), and 0.5 must not round to none."""
        if self.quota is None:
            return self.affinity
        return max(1, min(self.affinity, math.ceil(self.quota - 1e-9)))

    @property
    def cpus(self) -> int:
        """This rank's share: the process's CPUs divided by the ranks on the node, rounded down (the ranks
        share the same CPUs, so together they never exceed them), at least 1."""
        return max(1, self.process_cpus // self.ranks.count)

    def describe(self) -> str:
        """Where ``cpus`` came from, e.g. ``cgroup CPU quota 4 of 96 cores / 1 rank (LOCAL_WORLD_SIZE unset)``."""
        quota = None if self.quota is None else f"{self.quota:.2f}".rstrip("0").rstrip(".")
        if quota is not None and self.process_cpus < self.affinity:
            rounded = f" (rounded up to {self.process_cpus})" if self.process_cpus != self.quota else ""
            limit = f"cgroup CPU quota {quota}{rounded} of {self.machine} cores"
        else:
            mask = (
                f"{self.affinity} cores"
                if self.affinity == self.machine
                else f"{self.affinity} of {self.machine} cores (affinity)"
            )
            limit = f"{mask}, {'no cgroup CPU quota' if quota is None else f'cgroup CPU quota {quota}'}"
        ranks = self.ranks.count
        return f"{limit} / {ranks} rank{'s' if ranks != 1 else ''} ({self.ranks.source})"


def cpu_budget(
    ranks: Ranks | None = None,
    root: str = "/",
    environ: Mapping[str, str] | None = None,
    affinity: int | None = None,
    machine: int | None = None,
) -> CpuBudget:
    """Read the CPU budget: the affinity mask (or ``affinity``), the cgroup quota under ``root``, and ``ranks``
    (default: ``LOCAL_WORLD_SIZE`` from ``environ``)."""
    return CpuBudget(
        affinity=affinity_cpus() if affinity is None else affinity,
        quota=cgroup_cpu_quota(root),
        machine=(os.cpu_count() or 1) if machine is None else machine,
        ranks=local_ranks(None, environ) if ranks is None else ranks,
    )


def process_cpus() -> int:
    """The CPUs this process may use (affinity and cgroup quota); what ``stats()`` and ``doctor`` call cores."""
    return cpu_budget(Ranks(1, "")).process_cpus


# --- bytes --------------------------------------------------------------------------------------


def _size(nbytes: float) -> str:
    """Bytes in words: ``64 B``, ``1.5 KiB``, ``9.2 MiB``, ``1.2 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:.0f} B"


class Ceiling(NamedTuple):
    """The deepest ``prefetch`` the byte budget allows, and why."""

    depth: int
    why: str


def prefetch_ceiling(
    batch_bytes: int,
    slots_for: Callable[[int], int],
    most: int,
    workers: int,
    shm: int | None,
    memory: int | None,
    ranks: int = 1,
) -> Ceiling | None:
    """The deepest ``prefetch`` up to ``most`` whose ``slots_for(depth)`` batches of ``batch_bytes`` fit in this
    rank's part (``ranks``) of ``SHM_SHARE`` of free ``/dev/shm`` (``shm``) and of ``MEMORY_SHARE`` of the
    available memory (``memory``); a multiple of ``workers`` when at least that many, at least 1. None when
    there is nothing to bound by (no figure read, or an empty batch)."""
    rooms = []
    if shm is not None:
        rooms.append((SHM_SHARE * shm / ranks, f"/dev/shm has {_size(shm)} free"))
    if memory is not None:
        rooms.append(
            (MEMORY_SHARE * memory / ranks, f"{MEMORY_SHARE:.0%} of available memory is {_size(MEMORY_SHARE * memory)}")
        )
    if not rooms or batch_bytes <= 0:
        return None
    room, where = min(rooms)
    low, high = 1, max(1, most)  # the deepest depth whose slots fit: slots_for grows with the depth
    while low < high:
        middle = (low + high + 1) // 2
        if slots_for(middle) * batch_bytes <= room:
            low = middle
        else:
            high = middle - 1
    # Bound below ``most``: a multiple of the workers, as the per-worker depths are (batches come back in order).
    depth = low if low == most or low < workers or workers <= 0 else low - low % workers
    share = f" ({_size(room)} for each of {ranks} ranks)" if ranks > 1 else ""
    slots = slots_for(depth)
    fit = (
        f"the {slots} slots of prefetch={depth} fit"
        if slots * batch_bytes <= room
        else f"not even the {slots} slots of prefetch=1 fit"
    )
    return Ceiling(depth, f"{where}{share}, a batch is {_size(batch_bytes)}: {fit}")
