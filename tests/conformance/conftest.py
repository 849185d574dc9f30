"""The conformance suite's fixtures: each contract test runs once per executor of ``registry.ENTRIES``.

A test marked ``@pytest.mark.contract(name)`` that takes the ``executor`` fixture runs on every entry;
one that takes ``saved_on`` and ``loaded_on`` runs on every ordered pair of entries. A row the contract
does not apply to is reported as skipped with the entry's reason. After every row, what the executors
of the row may leave in this process (a segment, its mapping or descriptor; a live Ray actor) must be
gone: the suite's ``no_leaks`` covers the processes executor's children in the default run, and Ray
rows (marked ``ray``, which ``no_leaks`` leaves alone) are checked here.
"""

from __future__ import annotations

import gc

import pytest
import registry
from helpers import wait_until


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "contract(name): the contract a conformance test checks (registry.CONTRACTS; an entry may opt out)"
    )


def _contract(metafunc) -> str:
    marker = metafunc.definition.get_closest_marker("contract")
    assert marker is not None, f"{metafunc.function.__name__} needs @pytest.mark.contract(name)"
    return marker.args[0]


def pytest_generate_tests(metafunc):
    names = set(metafunc.fixturenames)
    if "executor" in names:
        metafunc.parametrize("executor", registry.rows(_contract(metafunc)), indirect=True)
    if {"saved_on", "loaded_on"} <= names:
        metafunc.parametrize(("saved_on", "loaded_on"), registry.pairs(_contract(metafunc)), indirect=True)


def _started(request) -> registry.Entry:
    entry: registry.Entry = request.param
    entry.start(request)
    return entry


@pytest.fixture
def executor(request) -> registry.Entry:
    """The executor this row runs on (started: its module imported, its fixtures up)."""
    return _started(request)


@pytest.fixture
def saved_on(request) -> registry.Entry:
    """The executor a state is saved on."""
    return _started(request)


@pytest.fixture
def loaded_on(request) -> registry.Entry:
    """The executor that state is loaded on."""
    return _started(request)


@pytest.fixture(autouse=True)
def nothing_of_the_row_left(request):
    """After every row: nothing that any closed loader of the row's executors may leave is left (the
    lifecycle tests check each loader's own processes, segments and actors while it runs and after)."""
    yield
    gc.collect()  # batches in reference cycles (a traceback kept by pytest.raises holds the frame's last batch)
    callspec = getattr(request.node, "callspec", None)
    entries = [v for v in callspec.params.values() if isinstance(v, registry.Entry)] if callspec else []
    for entry in entries:
        try:
            wait_until(lambda: not entry.strays(), entry.settle_s)  # noqa: B023
        except AssertionError:
            raise AssertionError(f"left behind by the {entry.name} row: {entry.strays()}") from None
