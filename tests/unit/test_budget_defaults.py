"""The defaults from the budget (issue 20, item 1): ``workers=None`` is the CPUs this rank may use, ``prefetch=None``
the per-worker depth never deeper than the bytes the slots may fill, ``local_ranks`` the ranks on the node; and
``stats()`` and ``doctor`` say where each number came from. The machine is faked through ``prefetch._budget``'s
readers (a fake cgroup tree, fake free /dev/shm and memory); no process is started here."""

from __future__ import annotations

import os
import warnings
from dataclasses import replace

import numpy as np
import pytest

import prefetch
from prefetch import _budget

MIB = 2**20
DATA = np.zeros((64, 4), np.float32)


def huge_source(sample_bytes: int, n: int = 8) -> np.ndarray:
    """``n`` samples of ``sample_bytes`` each, without the memory: every row views the same byte."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape=(n, sample_bytes), strides=(0, 0))


@pytest.fixture
def container(tmp_path, monkeypatch):
    """``container(quota, cores)``: this process seen as a cgroup v1 group whose CPU quota allows ``quota`` CPUs
    (None: none) on a host of ``cores`` cores, all in its affinity mask."""

    def make(quota: float | None, cores: int) -> None:
        point = tmp_path / "sys/fs/cgroup/cpu"
        (tmp_path / "proc/self").mkdir(parents=True, exist_ok=True)
        (tmp_path / "proc/self/cgroup").write_text("4:cpu:/kubepods/pod1\n0::/\n")
        (tmp_path / "proc/self/mountinfo").write_text(
            "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu\n"
        )
        (point / "kubepods/pod1").mkdir(parents=True, exist_ok=True)
        quota_us = -1 if quota is None else int(quota * 100_000)
        (point / "kubepods/pod1/cpu.cfs_quota_us").write_text(f"{quota_us}\n")
        (point / "kubepods/pod1/cpu.cfs_period_us").write_text("100000\n")
        read = _budget.cgroup_cpu_quota
        monkeypatch.setattr(_budget, "cgroup_cpu_quota", lambda root="/": read(str(tmp_path)))
        monkeypatch.setattr(_budget, "affinity_cpus", lambda: cores)
        monkeypatch.setattr(os, "cpu_count", lambda: cores)

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return make


@pytest.fixture
def machine(monkeypatch):
    """``machine(shm=, memory=)``: free bytes of /dev/shm and available memory as the budget reads them."""

    def make(shm: int | None, memory: int | None) -> None:
        monkeypatch.setattr(_budget, "shm_free", lambda path: shm)
        monkeypatch.setattr(_budget, "available_memory", lambda root="/": memory)

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return make


# --- workers ---------------------------------------------------------------------------------------------


def test_the_default_and_workers_none_in_a_container_with_a_cpu_quota_are_the_quota_not_the_host(container):
    container(quota=4, cores=96)
    loader = prefetch.Loader(DATA, batch_size=4, workers=None)
    assert loader.workers == 4 and not loader.config.auto_workers
    assert loader.config.provenance[0] == "workers=4: cgroup CPU quota 4 of 96 cores / 1 rank (LOCAL_WORLD_SIZE unset)"
    default = prefetch.Loader(DATA, batch_size=4)  # workers="auto": as many forked, given tasks on figures
    assert default.workers == 4 and default.config.auto_workers
    said = "workers=auto, at most 4: cgroup CPU quota 4 of 96 cores / 1 rank (LOCAL_WORLD_SIZE unset)"
    assert default.config.provenance[0] == said
    container(quota=None, cores=96)
    assert (
        prefetch.Loader(DATA, batch_size=4).workers == prefetch.Loader(DATA, batch_size=4, workers=None).workers == 96
    )


def test_workers_none_divides_among_the_ranks_of_the_node(container, monkeypatch):
    container(quota=None, cores=64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun's 8 ranks on a 64-core node: 8 workers each, not 64
    loader = prefetch.Loader(DATA, batch_size=4)
    assert loader.workers == 8 and loader.config.local_ranks == 8
    said = "at most 8: 64 cores, no cgroup CPU quota / 8 ranks (LOCAL_WORLD_SIZE=8)"
    assert loader.config.provenance[0] == f"workers=auto, {said}"
    assert prefetch.Loader(DATA, batch_size=4, workers=None).workers == 8
    assert prefetch.Loader(DATA, batch_size=4, local_ranks=2).workers == 32  # the option before the environment
    container(quota=1.5, cores=64)
    assert prefetch.Loader(DATA, batch_size=4).workers == 1  # 2 CPUs among 8 ranks: at least 1 each


def test_local_world_size_2_on_this_machine_gives_each_rank_half_the_cores(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cores = prefetch._budget.process_cpus()
    loader = prefetch.Loader(DATA, batch_size=4)
    assert loader.workers == max(1, cores // 2)  # on the project's 2-core machine: 1 worker per rank
    assert loader.workers < cores or cores == 1
    assert "/ 2 ranks (LOCAL_WORLD_SIZE=2)" in loader.config.provenance[0]


def test_given_workers_are_kept_whatever_the_ranks(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    loader = prefetch.Loader(DATA, batch_size=4, workers=3)
    assert loader.workers == 3 and loader.config.provenance[0] == "workers=3: as given"


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_local_ranks_must_be_a_positive_int(bad):
    error = TypeError if not isinstance(bad, int) or isinstance(bad, bool) else ValueError
    with pytest.raises(error, match="local_ranks must be an int >= 1"):
        prefetch.Loader(DATA, batch_size=4, local_ranks=bad)
    with pytest.raises(error, match="local_ranks"):
        prefetch.data_generator(4, DATA, DATA, local_ranks=bad)


def test_a_local_world_size_that_is_not_a_count_warns_at_the_users_line(monkeypatch, container):
    container(quota=None, cores=4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "eight")
    with pytest.warns(prefetch.PrefetchWarning, match="LOCAL_WORLD_SIZE='eight' is not an int >= 1") as record:
        loader = prefetch.Loader(DATA, batch_size=4)
    assert record[0].filename == __file__
    assert loader.workers == 4 and "LOCAL_WORLD_SIZE='eight' ignored" in loader.config.provenance[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prefetch.Loader(DATA, batch_size=4, local_ranks=2)  # given: the environment is not read


# --- prefetch -------------------------------------------------------------------------------------------------


def deepest_that_fits(source: np.ndarray, batch_bytes: int, room: float, workers: int, most: int) -> int:
    """Independently of the budget's search: try every depth with an explicit ``prefetch``."""
    fits = [
        depth
        for depth in range(1, most + 1)
        if prefetch.Loader(source, batch_size=1, workers=workers, prefetch=depth).config.max_slots * batch_bytes <= room
    ]
    return max(fits, default=1)


def test_a_deep_default_shrinks_to_what_free_shm_holds(machine):
    machine(shm=64 * MIB, memory=None)
    source = huge_source(10 * MIB)  # one sample is a 10 MiB batch
    loader = prefetch.Loader(source, batch_size=1, workers=2)
    expected = deepest_that_fits(source, 10 * MIB, 64 * MIB, workers=2, most=6)
    assert loader.prefetch == expected == 2  # 3 per worker would be 6: 14 slots of 10 MiB
    assert loader.config.max_slots * 10 * MIB <= 64 * MIB
    assert loader.config.provenance[1] == (
        "prefetch=2: /dev/shm has 64.0 MiB free, a batch is 10.0 MiB: the 6 slots of prefetch=2 fit; "
        "3 per worker would be 6"
    )


def test_the_default_takes_half_the_available_memory_shared_among_the_ranks(machine, monkeypatch):
    machine(shm=2**40, memory=400 * MIB)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    source = huge_source(10 * MIB)
    loader = prefetch.Loader(source, batch_size=1, workers=4)  # 2 per worker: 8
    room = 0.5 * 400 * MIB / 2
    assert loader.prefetch == deepest_that_fits(source, 10 * MIB, room, workers=4, most=8) == 4
    assert "50% of available memory is 200.0 MiB (100.0 MiB for each of 2 ranks)" in loader.config.provenance[1]


def test_a_default_that_fits_is_kept_and_says_so(machine):
    machine(shm=2**30, memory=2**40)
    loader = prefetch.Loader(DATA, batch_size=4, workers=2)  # batches of 4 x 4 float32
    assert loader.prefetch == 6
    assert loader.config.provenance[1] == (
        "prefetch=6: 3 per worker; /dev/shm has 1.0 GiB free, a batch is 64 B: the 14 slots of prefetch=6 fit"
    )


def test_an_explicit_prefetch_is_kept_even_above_the_budget(machine):
    machine(shm=64 * MIB, memory=None)
    loader = prefetch.Loader(huge_source(10 * MIB), batch_size=1, workers=2, prefetch=6)
    assert loader.prefetch == 6 and loader.config.provenance[1] == "prefetch=6: as given"
    (finding,) = [f for f in prefetch.doctor(loader).findings if f.what.startswith("sized:")]
    assert finding.level == "warn"
    assert "deeper than the byte budget allows now, prefetch=2" in finding.what
    assert "prefetch=2" in finding.fix and "leave prefetch= unset" in finding.fix


def test_with_a_transform_the_sources_size_is_the_estimate_and_says_so(machine):
    machine(shm=64 * MIB, memory=None)
    loader = prefetch.Loader(huge_source(10 * MIB), batch_size=1, workers=2, transform=lambda s: s)
    assert loader.prefetch == 2
    assert "(the sources' size, before your transforms)" in loader.config.provenance[1]


def test_without_numpy_sources_there_is_no_byte_bound_and_it_says_so(machine):
    machine(shm=1, memory=1)  # nothing would fit: but the size of a batch is unknown
    loader = prefetch.Loader(list(range(64)), batch_size=4, workers=2)
    assert loader.prefetch == 6
    assert loader.config.provenance[1] == (
        "prefetch=6: 3 per worker; no byte bound: a batch's size is known only once one is made "
        "(the sources are not numpy arrays)"
    )


def test_workers_0_reads_no_budget_for_prefetch(machine):
    machine(shm=1, memory=1)
    loader = prefetch.Loader(huge_source(10 * MIB), batch_size=1, workers=0)
    assert loader.config.provenance[1] == "prefetch=3: 3 per worker; nothing is prefetched with workers=0"


def test_the_bound_sizes_a_fresh_config_only(machine):
    """``load_state_dict`` keeps the depth it was made with (a new seed is not a new budget)."""
    machine(shm=64 * MIB, memory=None)
    loader = prefetch.Loader(huge_source(10 * MIB), batch_size=1, workers=2, seed=0)
    machine(shm=2**40, memory=None)
    loader.load_state_dict({**loader.state_dict(), "seed": 5})
    assert loader.prefetch == 2 and loader.seed == 5
    assert replace(loader.config).provenance == loader.config.provenance


# --- where the numbers came from: stats() and doctor ----------------------------------------------------------


def test_stats_say_where_workers_and_prefetch_came_from(container, machine):
    container(quota=1, cores=96)
    machine(shm=2**40, memory=2**40)
    with prefetch.Loader(DATA, batch_size=4, workers=None, seed=0) as loader:
        before = loader.stats()  # before any iteration
        assert before.provenance == loader.config.provenance
        assert before.provenance[0] == "workers=1: cgroup CPU quota 1 of 96 cores / 1 rank (LOCAL_WORLD_SIZE unset)"
        text = str(before)
        assert "sized" in text and "workers=1: cgroup CPU quota 1 of 96 cores" in text
        assert "prefetch=3: 3 per worker" in text


def test_stats_of_an_iteration_carry_the_provenance(machine):
    machine(shm=2**40, memory=2**40)
    with prefetch.Loader(DATA, batch_size=4, workers=0, seed=0) as loader:
        batches = iter(loader)
        next(batches)
        first = loader.stats()
        next(batches)
        later = loader.stats()
    assert first.provenance == later.provenance == loader.config.provenance
    assert later.since(first).provenance == loader.config.provenance
    assert later.to_dict()["provenance"] == loader.config.provenance


def test_doctor_says_where_the_defaults_come_from(container, machine):
    container(quota=4, cores=96)
    machine(shm=2**40, memory=2**40)
    report = prefetch.doctor()
    (defaults,) = [f for f in report.findings if f.what.startswith("defaults:")]
    assert defaults.level == "ok"
    assert "workers=4: cgroup CPU quota 4 of 96 cores / 1 rank (LOCAL_WORLD_SIZE unset)" in defaults.what
    (cores,) = [f for f in report.findings if f.what.startswith("cores:")]
    assert cores.what.startswith("cores: 4 usable;")  # the quota, not the host's 96
    assert "a default loader: 4 workers" in cores.what  # (what follows depends on whether torch is imported)
    loader = prefetch.Loader(DATA, batch_size=4)
    (sized,) = [f for f in prefetch.doctor(loader).findings if f.what.startswith("sized:")]
    assert sized.level == "ok" and sized.what == "sized: " + "; ".join(loader.config.provenance)


def test_doctor_weighs_the_cores_of_this_rank(container, monkeypatch):
    container(quota=None, cores=16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    (cores,) = [f for f in prefetch.doctor().findings if f.what.startswith("cores:")]
    assert cores.what.startswith("cores: 4 for this rank (16 usable / 4 ranks, LOCAL_WORLD_SIZE=4);")
    assert "a default loader: 4 workers" in cores.what
    for loader, source in [
        (prefetch.Loader(DATA, batch_size=4), "LOCAL_WORLD_SIZE=4"),
        (prefetch.Loader(DATA, batch_size=4, local_ranks=2), "local_ranks=2"),
    ]:
        (cores,) = [f for f in prefetch.doctor(loader).findings if f.what.startswith("cores:")]
        ranks = loader.config.local_ranks
        assert cores.what.startswith(f"cores: {16 // ranks} for this rank (16 usable / {ranks} ranks, {source});")
        assert f"the loader: {16 // ranks} workers" in cores.what


def test_doctor_warns_about_a_local_world_size_it_cannot_read(container, monkeypatch):
    container(quota=None, cores=4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "all")
    (defaults,) = [f for f in prefetch.doctor().findings if f.what.startswith("defaults:")]
    assert defaults.level == "warn" and "LOCAL_WORLD_SIZE='all' ignored" in defaults.what
    assert "local_ranks=" in defaults.fix
