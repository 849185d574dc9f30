"""Decode once (contract 3.11) on every executor: with ``load=`` and ``cache=<dir>`` the stream over two epochs
is the ``workers=0`` stream without a cache, both for the loader that fills the directory and for the next one,
which reads it."""

from __future__ import annotations

import pytest
import registry
from cachehelpers import double
from workloads import DATA_X, LABELS, OPTIONS, digest

import prefetch


@pytest.mark.contract(registry.CACHE)
def test_a_cached_stream_is_the_uncached_workers_0_stream(executor, tmp_path):
    options = {**OPTIONS, "load": double}
    with prefetch.Loader(DATA_X, LABELS, workers=0, **options) as loader:
        expected = [digest(batch) for batch in loader.stream()]
    for run in ("fills", "reads"):
        with executor.loader(DATA_X, LABELS, cache=str(tmp_path / "cache"), **options) as loader:
            assert [digest(batch) for batch in loader.stream()] == expected, f"the loader that {run} the cache"
