"""Shared fixtures: every test must leave no process and no shared-memory segment behind."""

from __future__ import annotations

import gc
import os
import sys

import multiprocess
import psutil
import pytest
from helpers import DEFAULT_START_METHODS, FakeTorch, segment_descriptors_here, segments_mapped_here, segments_of
from raysession import local_ray, ray_instances  # noqa: F401  (fixtures: one Ray instance for every tier)

from prefetch.ipc.segments import SHM_DIR

# multiprocess's own helpers live as long as the test session by design; they are not ours.
_SESSION_HELPERS = ("resource_tracker", "forkserver")
# How long processes of a closed loader may take to disappear.
EXIT_GRACE_S = 5.0
# The start methods a test taking the `start_method` fixture runs under (helpers.DEFAULT_START_METHODS, which
# the conformance suite's processes rows use too), unless it says otherwise with @pytest.mark.start_methods(...).


def _children() -> list[psutil.Process]:
    kids = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if not any(helper in cmdline for helper in _SESSION_HELPERS):
            kids.append(child)
    return kids


def pytest_configure(config):
    # pytest-timeout (timeout_method = "thread") runs a timer thread during every test: the
    # pre-flight check rightly warns about threads before fork, but not about that one.
    config.addinivalue_line(
        "filterwarnings", r"ignore:1 more thread running in this process \('pytest_timeout:prefetch.PrefetchWarning"
    )
    # Python 3.12+ says the same of that thread at every fork (prefetch itself starts no thread).
    config.addinivalue_line(
        "filterwarnings", r"ignore:This process \(pid=\d+\) is multi-threaded, use of fork\(\):DeprecationWarning"
    )


def pytest_generate_tests(metafunc):
    """Parametrize the `start_method` fixture: the marker's methods (default: DEFAULT_START_METHODS) that
    this platform has, in that order, each a test case named after it."""
    if "start_method" not in metafunc.fixturenames:
        return
    for parametrize in metafunc.definition.iter_markers("parametrize"):
        names = parametrize.args[0]
        if "start_method" in ([name.strip() for name in names.split(",")] if isinstance(names, str) else names):
            return  # the test pairs start methods with other arguments itself (with workers=0, say)
    marker = metafunc.definition.get_closest_marker("start_methods")
    wanted = marker.args if marker else DEFAULT_START_METHODS
    available = multiprocess.get_all_start_methods()
    methods = [method for method in wanted if method in available]
    metafunc.parametrize("start_method", methods, indirect=True, ids=methods)


@pytest.fixture
def start_method(request) -> str:
    """The multiprocess start method to run the loader with (see pytest_generate_tests)."""
    return request.param


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail a test that leaves a child process, a new /dev/shm segment, or a mapping of or a
    descriptor to a segment in this process behind. (A test that keeps batches on purpose drops
    them when it returns: its locals are gone by then. A test marked ``holds_batches`` hands batches to
    a framework that keeps them out of Python's reach: their mappings and descriptors may outlive it, nothing
    else. A test marked ``ray`` is left to check its own loader: Ray starts and pools processes of its own.)"""
    if request.node.get_closest_marker("ray") is not None:
        yield
        return
    before_children = {p.pid for p in _children()}
    before_segments = set(segments_of(os.getpid()))
    before_mapped = segments_mapped_here()
    before_descriptors = segment_descriptors_here()
    yield
    gc.collect()  # batches in reference cycles (a traceback kept by pytest.raises, ...)
    mapped = segments_mapped_here() - before_mapped
    descriptors = segment_descriptors_here() - before_descriptors
    new = [p for p in _children() if p.pid not in before_children]
    _, alive = psutil.wait_procs(new, timeout=EXIT_GRACE_S)
    for process in alive:
        process.kill()
    leaked = set(segments_of(os.getpid())) - before_segments
    for name in leaked:
        os.unlink(os.path.join(SHM_DIR, name))
    assert not alive, f"child processes left running: {[p.pid for p in alive]}"
    assert not leaked, f"shared-memory segments left in {SHM_DIR}: {sorted(leaked)}"
    if request.node.get_closest_marker("holds_batches") is None:  # a held batch keeps its mapping and descriptor
        assert not mapped, f"segments still mapped in this process: {sorted(mapped)}"
        assert not descriptors, f"descriptors to segments still open in this process: {sorted(descriptors)}"


@pytest.fixture
def fake_torch(monkeypatch):
    """A ``FakeTorch`` with 2 intra-op threads standing in for ``torch`` in ``sys.modules`` during the test."""
    torch = FakeTorch(threads=2)
    monkeypatch.setitem(sys.modules, "torch", torch)
    return torch
