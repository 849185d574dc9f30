"""Confining a benchmark run to one CPU, as a container limited by a CPU quota is (issue 20's "container" target).

``one_cpu()`` makes a cgroup of the cpu controller with a quota of 1 CPU (v1 ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``, or v2 ``cpu.max`` where the controller is delegated), and yields the command prefix that
starts a process inside it (``sh -c 'echo $$ > cgroup.procs && exec "$@"'``: the process and every process it
starts are in the group from their first instruction). When the cgroup file system is not writable it falls back
to ``taskset -c <one core>`` (an affinity mask of one core, which the loader also reads) and says so. The group is
removed afterwards, whatever happened.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# The CFS period of the group: the kernel's default (100 ms); the quota is the same, for 1 CPU.
PERIOD_US = 100_000


@dataclass(frozen=True)
class Confinement:
    """How the runs are confined: ``how`` in words (for the report), ``prefix`` before each command."""

    how: str
    prefix: tuple[str, ...]


def _cpu_group_home() -> tuple[int, Path] | None:
    """This process's cgroup of the cpu controller, or None."""
    from prefetch import _budget

    version, directories = _budget.cgroup_dirs("cpu")
    return (version, Path(directories[0])) if directories else None


def _make_group(name: str) -> tuple[int, Path, Path] | str:
    """``(version, group, home)`` of a new 1-CPU group, or why none could be made."""
    found = _cpu_group_home()
    if found is None:
        return "no cgroup cpu controller is mounted"
    version, home = found
    if version == 2 and "cpu" not in (home / "cgroup.subtree_control").read_text().split():
        return f"the cgroup v2 cpu controller is not delegated below {home}"
    group = home / name
    try:
        group.mkdir()
    except OSError as error:
        return f"the cgroup file system is not writable (mkdir {group}: {error.strerror})"
    try:
        if version == 1:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(PERIOD_US))
        else:
            (group / "cpu.max").write_text(f"{PERIOD_US} {PERIOD_US}")
    except OSError as error:
        os.rmdir(group)
        return f"cannot set a quota in {group}: {error.strerror}"
    return version, group, home


def _remove_group(group: Path, home: Path) -> None:
    """Move whatever is left in ``group`` back ``home``, then remove it."""
    for pid in (group / "cgroup.procs").read_text().split():
        try:
            (home / "cgroup.procs").write_text(pid)
        except OSError as error:
            if error.errno != errno.ESRCH:  # ended meanwhile
                raise
    os.rmdir(group)


@contextlib.contextmanager
def one_cpu() -> Iterator[Confinement]:
    """Confine the runs started with the yielded prefix to one CPU: a cgroup quota, else ``taskset``."""
    made = _make_group(f"prefetch-bench-{os.getpid()}")
    if isinstance(made, str):
        taskset = shutil.which("taskset")
        if taskset is None:
            raise RuntimeError(f"cannot confine the runs to one CPU: {made}, and taskset is not installed")
        core = min(os.sched_getaffinity(0))
        yield Confinement(f"taskset -c {core} ({made})", (taskset, "-c", str(core)))
        return
    version, group, home = made
    procs = group / "cgroup.procs"
    try:
        yield Confinement(
            f"cgroup v{version} {group} with a CPU quota of 1 CPU ({PERIOD_US} us per {PERIOD_US} us)",
            ("sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh"),
        )
    finally:
        _remove_group(group, home)
