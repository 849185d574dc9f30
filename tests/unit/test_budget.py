"""Reading the machine's budget (``prefetch._budget``) from fake trees: cgroup v1 and v2 CPU quotas (set, unset,
fractional, nested, missing, unreadable), the affinity mask and the ranks on the node, available memory, and
the byte ceiling of ``prefetch``. Every reader takes the root it reads under; these tests write the files a
kernel would show under ``tmp_path``."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import pytest

from prefetch import _budget
from prefetch._budget import Ranks

MIB = 2**20
# A v1 line of /proc/self/mountinfo for the cpu controller (co-mounted with cpuacct, as Docker hosts do), with
# an optional field before the separator; and a cgroup2 one.
V1_CPU = "32 31 0:29 {root} {point} rw,nosuid,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n"
V1_MEMORY = "35 31 0:32 {root} {point} rw,relatime shared:12 - cgroup cgroup rw,memory\n"
V2 = "41 31 0:38 {root} {point} rw,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def proc(tmp_path: Path, cgroup: str, mountinfo: str) -> None:
    write(tmp_path / "proc/self/cgroup", cgroup)
    write(tmp_path / "proc/self/mountinfo", mountinfo)


def v1_tree(tmp_path: Path, path: str, quotas: dict[str, tuple[int, int]], mount_root: str = "/") -> Path:
    """A v1 cpu hierarchy at /sys/fs/cgroup/cpu,cpuacct: the process in ``path``; ``quotas`` maps a cgroup
    (relative to the mount) to (cfs_quota_us, cfs_period_us)."""
    point = "/sys/fs/cgroup/cpu,cpuacct"
    proc(tmp_path, f"5:memory:/\n4:cpu,cpuacct:{path}\n0::/\n", V1_CPU.format(root=mount_root, point=point))
    mount = tmp_path / point.lstrip("/")
    for group, (quota, period) in quotas.items():
        write(mount / group.strip("/") / "cpu.cfs_quota_us", f"{quota}\n")
        write(mount / group.strip("/") / "cpu.cfs_period_us", f"{period}\n")
    return mount


def v2_tree(tmp_path: Path, path: str, limits: dict[str, str]) -> Path:
    """A unified hierarchy at /sys/fs/cgroup: the process in ``path``; ``limits`` maps a cgroup to its cpu.max."""
    proc(tmp_path, f"0::{path}\n", V2.format(root="/", point="/sys/fs/cgroup"))
    mount = tmp_path / "sys/fs/cgroup"
    mount.mkdir(parents=True, exist_ok=True)
    for group, text in limits.items():
        write(mount / group.strip("/") / "cpu.max", text + "\n")
    return mount


# --- the cgroup CPU quota -----------------------------------------------------------------------------------


def test_v1_a_quota_is_quota_over_period(tmp_path):
    v1_tree(tmp_path, "/job", {"/job": (400_000, 100_000), "/": (-1, 100_000)})
    assert _budget.cgroup_cpu_quota(str(tmp_path)) == 4.0


def test_v1_minus_one_is_no_quota(tmp_path):
    v1_tree(tmp_path, "/job", {"/job": (-1, 100_000), "/": (-1, 100_000)})
    assert _budget.cgroup_cpu_quota(str(tmp_path)) is None


def test_v1_a_fractional_quota_is_kept_and_rounded_up_only_for_the_cpu_count(tmp_path):
    v1_tree(tmp_path, "/job", {"/job": (150_000, 100_000)})
    quota = _budget.cgroup_cpu_quota(str(tmp_path))
    assert quota == 1.5
    budget = _budget.CpuBudget(affinity=8, quota=quota, machine=8, ranks=Ranks(1, "LOCAL_WORLD_SIZE unset"))
    assert budget.process_cpus == 2 and budget.cpus == 2
    assert budget.describe() == "cgroup CPU quota 1.5 (rounded up to 2) of 8 cores / 1 rank (LOCAL_WORLD_SIZE unset)"
    half = _budget.CpuBudget(affinity=8, quota=0.5, machine=8, ranks=Ranks(1, ""))
    assert half.process_cpus == 1  # never 0


@pytest.mark.parametrize(
    "quotas, expected",
    [
        ({"/a/b/c": (-1, 100_000), "/a/b": (200_000, 100_000), "/a": (800_000, 100_000)}, 2.0),  # a parent limits
        ({"/a/b/c": (300_000, 100_000), "/a/b": (200_000, 100_000), "/a": (-1, 100_000)}, 2.0),  # the smallest
        ({"/a/b/c": (50_000, 50_000), "/a/b": (-1, 100_000), "/a": (600_000, 200_000)}, 1.0),  # periods differ
        ({"/a": (100_000, 100_000)}, 1.0),  # levels without the files are no limit
    ],
)
def test_v1_the_smallest_quota_on_the_way_up_limits(tmp_path, quotas, expected):
    v1_tree(tmp_path, "/a/b/c", quotas)
    assert _budget.cgroup_cpu_quota(str(tmp_path)) == expected


def test_v1_a_mount_of_the_process_own_cgroup_is_read_at_its_mount_point(tmp_path):
    """Docker without a cgroup namespace: /proc/self/cgroup names /docker/<id>, which is mounted as the root."""
    mount = v1_tree(tmp_path, "/docker/abc", {"/": (200_000, 100_000)}, mount_root="/docker/abc")
    assert _budget.cgroup_dirs("cpu", str(tmp_path)) == (1, [str(mount)])
    assert _budget.cgroup_cpu_quota(str(tmp_path)) == 2.0


def test_a_mount_point_with_a_space_is_unescaped(tmp_path):
    point = "/sys/fs/cgroup/my cpu"
    proc(tmp_path, "4:cpu:/job\n", V1_CPU.format(root="/", point=point.replace(" ", "\\040")))
    write(tmp_path / "sys/fs/cgroup/my cpu/job/cpu.cfs_quota_us", "300000")
    write(tmp_path / "sys/fs/cgroup/my cpu/job/cpu.cfs_period_us", "100000")
    assert _budget.cgroup_cpu_quota(str(tmp_path)) == 3.0


def test_v2_cpu_max(tmp_path):
    v2_tree(tmp_path, "/user.slice/job", {"/user.slice/job": "200000 100000"})
    assert _budget.cgroup_cpu_quota(str(tmp_path)) == 2.0


def test_v2_max_is_no_quota_and_a_parent_still_limits(tmp_path):
    v2_tree(tmp_path, "/user.slice/job", {"/user.slice/job": "max 100000"})
    assert _budget.cgroup_cpu_quota(str(tmp_path)) is None
    v2_tree(tmp_path, "/user.slice/job", {"/user.slice/job": "max 100000", "/user.slice": "150000 100000"})
    assert _budget.cgroup_cpu_quota(str(tmp_path)) == 1.5


def test_v2_in_a_cgroup_namespace_reads_the_mount_point_itself(tmp_path):
    """A container with its own cgroup namespace sees itself as "/", and its cpu.max at the mount point."""
    mount = v2_tree(tmp_path, "/", {"/": "400000 100000"})
    assert _budget.cgroup_dirs("cpu", str(tmp_path)) == (2, [str(mount)])
    assert _budget.cgroup_cpu_quota(str(tmp_path)) == 4.0


def test_v1_cpu_controller_comes_before_the_unified_hierarchy_in_hybrid_mode(tmp_path):
    point = "/sys/fs/cgroup/cpu,cpuacct"
    mountinfo = V1_CPU.format(root="/", point=point) + V2.format(root="/", point="/sys/fs/cgroup/unified")
    proc(tmp_path, "4:cpu,cpuacct:/job\n0::/job\n", mountinfo)
    write(tmp_path / "sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_quota_us", "100000")
    write(tmp_path / "sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_period_us", "100000")
    write(tmp_path / "sys/fs/cgroup/unified/job/cpu.max", "300000 100000")
    assert _budget.cgroup_cpu_quota(str(tmp_path)) == 1.0


@pytest.mark.parametrize(
    "cgroup, mountinfo",
    [
        ("5:memory:/job\n", V1_MEMORY.format(root="/", point="/sys/fs/cgroup/memory")),  # no cpu controller
        ("4:cpu,cpuacct:/job\n", V1_MEMORY.format(root="/", point="/sys/fs/cgroup/memory")),  # not mounted
        ("4:cpu,cpuacct:/job\n", V1_CPU.format(root="/other", point="/sys/fs/cgroup/cpu")),  # another part
        ("0::/../outside\n", V2.format(root="/", point="/sys/fs/cgroup")),  # outside the namespace's view
        ("", ""),  # no /proc files at all (empty)
    ],
)
def test_no_controller_to_read_is_no_quota(tmp_path, cgroup, mountinfo):
    proc(tmp_path, cgroup, mountinfo)
    assert _budget.cgroup_dirs("cpu", str(tmp_path)) == (0, [])
    assert _budget.cgroup_cpu_quota(str(tmp_path)) is None


def test_missing_proc_files_are_no_quota(tmp_path):
    assert _budget.cgroup_dirs("cpu", str(tmp_path)) == (0, [])
    assert _budget.cgroup_cpu_quota(str(tmp_path)) is None


def test_unreadable_or_malformed_files_are_no_limit_at_that_level(tmp_path, monkeypatch):
    mount = v1_tree(tmp_path, "/a/b", {"/a/b": (100_000, 100_000), "/a": (300_000, 100_000)})
    denied = str(mount / "a/b/cpu.cfs_quota_us")
    real_open = builtins.open

    def guarded(path, *args, **kwargs):
        if os.fspath(path) == denied:
            raise PermissionError(13, "Permission denied", denied)
        return real_open(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", guarded)
        assert _budget.cgroup_cpu_quota(str(tmp_path)) == 3.0  # the leaf cannot be read: its parent still limits
    write(mount / "a/b/cpu.cfs_quota_us", "lots\n")
    assert _budget.cgroup_cpu_quota(str(tmp_path)) == 3.0
    write(mount / "a/b/cpu.cfs_period_us", "0\n")
    write(mount / "a/b/cpu.cfs_quota_us", "100000\n")
    assert _budget.cgroup_cpu_quota(str(tmp_path)) == 3.0  # a zero period is no quota, not a division by zero
    os.remove(mount / "a/b/cpu.cfs_quota_us")
    (mount / "a/b/cpu.cfs_quota_us").mkdir()  # a directory where a file should be
    assert _budget.cgroup_cpu_quota(str(tmp_path)) == 3.0
    v2_tree(tmp_path, "/job", {"/job": "garbage"})
    assert _budget.cgroup_cpu_quota(str(tmp_path)) is None


# --- the CPUs of a rank: affinity, quota, ranks ---------------------------------------------------------------


@pytest.mark.parametrize(
    "affinity, quota, machine, environ, given, expected",
    [
        (2, None, 2, {}, None, 2),  # this machine, alone
        (2, None, 2, {"LOCAL_WORLD_SIZE": "2"}, None, 1),  # two ranks on two cores: one each
        (96, 4.0, 96, {}, None, 4),  # a 4-CPU container on a 96-core host
        (64, None, 64, {"LOCAL_WORLD_SIZE": "8"}, None, 8),  # torchrun, 8 ranks on 64 cores
        (96, 4.0, 96, {"LOCAL_WORLD_SIZE": "8"}, None, 1),  # fewer CPUs than ranks: at least 1
        (3, None, 4, {"LOCAL_WORLD_SIZE": "2"}, None, 1),  # rounded down: together never more than the CPUs
        (4, 8.0, 8, {}, None, 4),  # the affinity mask is the smaller
        (8, 2.5, 8, {}, None, 3),  # a fractional quota, rounded up
        (64, None, 64, {"LOCAL_WORLD_SIZE": "2"}, 4, 16),  # local_ranks= before the environment
    ],
)
def test_the_cpus_of_a_rank(tmp_path, affinity, quota, machine, environ, given, expected):
    if quota is not None:
        v1_tree(tmp_path, "/job", {"/job": (int(quota * 100_000), 100_000)})
    ranks = _budget.local_ranks(given, environ)
    budget = _budget.cpu_budget(ranks, str(tmp_path), affinity=affinity, machine=machine)
    assert budget.quota == quota
    assert budget.cpus == expected


def test_the_provenance_says_which_limit_and_how_many_ranks(tmp_path):
    v1_tree(tmp_path, "/job", {"/job": (400_000, 100_000)})
    quota = _budget.cpu_budget(_budget.local_ranks(None, {}), str(tmp_path), affinity=96, machine=96)
    assert quota.describe() == "cgroup CPU quota 4 of 96 cores / 1 rank (LOCAL_WORLD_SIZE unset)"
    v1_tree(tmp_path, "/job", {"/job": (-1, 100_000)})
    ranks = _budget.local_ranks(None, {"LOCAL_WORLD_SIZE": "8"})
    mask = _budget.cpu_budget(ranks, str(tmp_path), affinity=16, machine=64)
    assert mask.describe() == "16 of 64 cores (affinity), no cgroup CPU quota / 8 ranks (LOCAL_WORLD_SIZE=8)"
    v1_tree(tmp_path, "/job", {"/job": (800_000, 100_000)})
    loose = _budget.cpu_budget(_budget.local_ranks(2, {}), str(tmp_path), affinity=2, machine=2)
    assert loose.describe() == "2 cores, cgroup CPU quota 8 / 2 ranks (local_ranks=2)"


@pytest.mark.parametrize("raw", ["abc", "0", "-2", "", "1.5"])
def test_a_local_world_size_that_is_not_a_count_is_ignored_and_said(raw):
    ranks = _budget.local_ranks(None, {"LOCAL_WORLD_SIZE": raw})
    assert ranks.count == 1 and ranks.ignored == raw and "ignored" in ranks.source


# --- memory and /dev/shm ------------------------------------------------------------------------------------


def test_available_memory_is_the_smaller_of_memavailable_and_the_cgroups_room(tmp_path):
    write(tmp_path / "proc/meminfo", "MemTotal:  8000000 kB\nMemFree:  10 kB\nMemAvailable:  4000000 kB\n")
    assert _budget.available_memory(str(tmp_path)) == 4_000_000 * 1024  # no memory cgroup to read
    point = "/sys/fs/cgroup/memory"
    proc(tmp_path, "5:memory:/job\n", V1_MEMORY.format(root="/", point=point))
    job = tmp_path / point.lstrip("/") / "job"
    write(job / "memory.limit_in_bytes", str(512 * MIB))
    write(job / "memory.usage_in_bytes", str(400 * MIB))
    write(job / "memory.stat", f"cache 1\ntotal_inactive_file {100 * MIB}\n")  # page cache it can drop is room
    assert _budget.available_memory(str(tmp_path)) == 212 * MIB
    write(job.parent / "memory.limit_in_bytes", str(2**63 - 4096))  # the root: no limit
    write(job.parent / "memory.usage_in_bytes", str(8 * 2**30))
    assert _budget.available_memory(str(tmp_path)) == 212 * MIB


def test_available_memory_v2_max_is_no_limit(tmp_path):
    write(tmp_path / "proc/meminfo", "MemAvailable:  1024 kB\n")
    mount = v2_tree(tmp_path, "/job", {})
    write(mount / "job/memory.max", "max\n")
    write(mount / "job/memory.current", "1\n")
    assert _budget.available_memory(str(tmp_path)) == MIB
    write(mount / "job/memory.max", str(MIB // 2))
    write(mount / "job/memory.stat", "anon 1\ninactive_file 0\n")
    assert _budget.available_memory(str(tmp_path)) == MIB // 2 - 1


def test_nothing_readable_is_none(tmp_path):
    assert _budget.available_memory(str(tmp_path)) is None
    assert _budget.shm_free(str(tmp_path / "missing")) is None


# --- the byte ceiling of prefetch -----------------------------------------------------------------------------


def slots(depth: int) -> int:
    """A stand-in for ``LoaderConfig.max_slots``: the window, as many held, and two more."""
    return 2 * depth + 2


def test_the_ceiling_is_the_deepest_depth_whose_slots_fit():
    # 10 MiB batches, 64 MiB of /dev/shm free: 2 * d + 2 <= 6.4 -> d = 2
    ceiling = _budget.prefetch_ceiling(10 * MIB, slots, most=6, workers=2, shm=64 * MIB, memory=None)
    assert ceiling is not None and ceiling.depth == 2
    assert ceiling.why == "/dev/shm has 64.0 MiB free, a batch is 10.0 MiB: the 6 slots of prefetch=2 fit"


def test_the_ceiling_keeps_a_depth_that_fits_and_rounds_a_bound_one_to_the_workers():
    roomy = _budget.prefetch_ceiling(MIB, slots, most=12, workers=4, shm=2**40, memory=2**40)
    assert roomy is not None and roomy.depth == 12
    odd = _budget.prefetch_ceiling(MIB, slots, most=7, workers=2, shm=2**40, memory=2**40)
    assert odd is not None and odd.depth == 7  # as asked: not bound, not rounded
    # 2 * d + 2 <= 16 -> d = 7, rounded down to 3 workers' multiple: 6
    bound = _budget.prefetch_ceiling(MIB, slots, most=12, workers=3, shm=16 * MIB, memory=None)
    assert bound is not None and bound.depth == 6
    few = _budget.prefetch_ceiling(MIB, slots, most=12, workers=4, shm=8 * MIB, memory=None)
    assert few is not None and few.depth == 3  # fewer than the workers: kept as it is


def test_the_ceiling_takes_half_the_memory_and_shares_among_the_ranks():
    # memory: half of 80 MiB = 40 MiB; 2 * d + 2 <= 4 -> d = 1
    memory = _budget.prefetch_ceiling(10 * MIB, slots, most=6, workers=1, shm=1000 * MIB, memory=80 * MIB)
    assert memory is not None and memory.depth == 1 and "50% of available memory is 40.0 MiB" in memory.why
    # two ranks share 128 MiB of /dev/shm: 64 each, as one rank's 64 above
    shared = _budget.prefetch_ceiling(10 * MIB, slots, most=6, workers=1, shm=128 * MIB, memory=None, ranks=2)
    assert shared is not None and shared.depth == 2 and "64.0 MiB for each of 2 ranks" in shared.why


def test_the_ceiling_is_at_least_one_and_says_when_even_that_does_not_fit():
    ceiling = _budget.prefetch_ceiling(10 * MIB, slots, most=6, workers=2, shm=20 * MIB, memory=None)
    assert ceiling is not None and ceiling.depth == 1 and "not even the 4 slots of prefetch=1 fit" in ceiling.why


def test_no_figures_no_ceiling():
    assert _budget.prefetch_ceiling(MIB, slots, most=6, workers=2, shm=None, memory=None) is None
    assert _budget.prefetch_ceiling(0, slots, most=6, workers=2, shm=MIB, memory=MIB) is None


def test_the_budget_reads_the_directory_the_slots_live_in():
    from prefetch.ipc.segments import SHM_DIR

    assert _budget.shm_dir() == SHM_DIR  # the same rule, without importing the engine at construction
