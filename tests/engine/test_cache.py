"""load= and cache=: decode once (docs/design.md, "Decode once"). Batches are the same bytes with and without
the cache, for any workers; load runs once per sample over epochs (counted across processes); cache_bytes
holds; a cache directory made for another source or load is rebuilt, never read."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from cachehelpers import BATCH, IMAGES, LABELS, CountingLoad, N, calls, stream_digest

import prefetch
from prefetch.ipc.segments import NAME_ROOT, SHM_DIR


def _cache(kind: str, tmp_path) -> str:
    return "memory" if kind == "memory" else str(tmp_path / "cache")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["memory", "dir"])
def test_batches_are_the_same_bytes_with_and_without_the_cache(tmp_path, workers, kind):
    log = str(tmp_path / "calls")
    plain = stream_digest(epochs=3, workers=0, load=CountingLoad(str(tmp_path / "plain")))
    cached = stream_digest(epochs=3, workers=workers, load=CountingLoad(log), cache=_cache(kind, tmp_path))
    assert cached == plain
    assert sorted(set(calls(log))) == list(range(N))  # the cache was used: not every epoch loaded again
    assert len(calls(log)) < 3 * N


@pytest.mark.start_methods("spawn")
def test_a_spawned_coordinator_shares_the_loaders_memory_cache(tmp_path, start_method):
    log = str(tmp_path / "calls")
    plain = stream_digest(epochs=2, workers=0, load=CountingLoad(str(tmp_path / "plain")))
    options = dict(workers=2, start_method=start_method, load=CountingLoad(log), cache="memory")
    assert stream_digest(epochs=2, **options) == plain
    assert len(calls(log)) < 2 * N


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["memory", "dir"])
def test_load_runs_once_per_sample_over_epochs(tmp_path, workers, kind):
    log = str(tmp_path / "calls")
    options = dict(workers=workers, prefetch=2, shuffle=False, load=CountingLoad(log), cache=_cache(kind, tmp_path))
    stream_digest(epochs=4, **options)
    assert sorted(calls(log)) == list(range(N))


def test_without_a_cache_load_runs_every_epoch(tmp_path):
    log = str(tmp_path / "calls")
    stream_digest(epochs=3, workers=0, load=CountingLoad(log))
    assert sorted(calls(log)) == sorted(list(range(N)) * 3)


def test_load_runs_before_transform_and_transform_sees_its_result():
    seen = []
    with prefetch.Loader(
        IMAGES,
        LABELS,
        batch_size=BATCH,
        workers=0,
        epochs=1,
        shuffle=False,
        load=lambda s: ("loaded", s),
        transform=lambda s: seen.append(s[0]) or s[1],
    ) as loader:
        list(loader)
    assert seen == ["loaded"] * N


@pytest.mark.parametrize("kind", ["memory", "dir"])
def test_samples_past_cache_bytes_are_loaded_again(tmp_path, kind):
    log = str(tmp_path / "calls")
    entry = len(pickle.dumps(CountingLoad(str(tmp_path / "size"))((IMAGES[0], LABELS[0])), protocol=5))
    kept = 10
    options = dict(workers=2, prefetch=2, shuffle=False, load=CountingLoad(log), cache=_cache(kind, tmp_path))
    plain = stream_digest(epochs=3, workers=0, shuffle=False, load=CountingLoad(str(tmp_path / "plain")))
    assert stream_digest(epochs=3, cache_bytes=kept * entry + entry // 2, **options) == plain
    assert len(calls(log)) == N + 2 * (N - kept)  # the first epoch all, then the ones left out, every epoch


def test_memory_entries_live_in_the_loaders_segments_and_go_with_close(tmp_path):
    mine = f"{NAME_ROOT}{os.getpid()}-"
    with prefetch.Loader(
        IMAGES, LABELS, batch_size=BATCH, epochs=1, workers=2, load=CountingLoad(str(tmp_path / "c")), cache="memory"
    ) as loader:
        list(loader)
        entries = [name for name in os.listdir(SHM_DIR) if name.startswith(mine) and "-cache-s" in name]
        assert len(entries) == N
    assert not [name for name in os.listdir(SHM_DIR) if name.startswith(mine)]


def test_a_dropped_loader_frees_its_memory_cache(tmp_path):
    mine = f"{NAME_ROOT}{os.getpid()}-"
    load = CountingLoad(str(tmp_path / "calls"))
    loader = prefetch.Loader(IMAGES, LABELS, batch_size=BATCH, epochs=1, workers=0, load=load, cache="memory")
    list(loader)
    assert any("-cache-s" in name for name in os.listdir(SHM_DIR) if name.startswith(mine))
    del loader
    assert not [name for name in os.listdir(SHM_DIR) if name.startswith(mine)]


# --- a directory is for one source and one load --------------------------------------------------------


def _scaled(factor):
    def load(sample):
        return sample[0] * np.float32(factor), sample[1]

    return load


def _shifted(sample):
    return sample[0] + np.float32(1), sample[1]


STALE = {
    "another source": dict(sources=(IMAGES[::-1].copy(), LABELS)),
    "another length": dict(sources=(IMAGES[:-4], LABELS[:-4])),
    "another load function": dict(load=_shifted),
    "another value in load's closure": dict(load=_scaled(3.0)),
}


def _run_counted(tmp_path, sources, load, cache: str | None) -> tuple[str, list[int]]:
    """Two epochs of ``sources`` with ``load``: the stream's digest and the indices ``load`` was called for."""
    import hashlib

    digest = hashlib.sha256()
    log = str(tmp_path / "calls")  # the same path every run: it is part of the counted load's identity

    def counted(sample):
        with open(log, "a") as file:
            file.write(f"{int(sample[1])}\n")
        return load(sample)

    with prefetch.Loader(*sources, batch_size=BATCH, seed=3, epochs=2, workers=0, load=counted, cache=cache) as loader:
        for images, labels in loader.stream():
            digest.update(images.tobytes() + labels.tobytes())
    called = calls(log)
    if called:
        os.unlink(log)
    return digest.hexdigest(), called


@pytest.mark.parametrize("change", list(STALE))
def test_a_directory_made_for_something_else_is_rebuilt_never_read(tmp_path, change):
    directory = str(tmp_path / "cache")
    first = dict(sources=(IMAGES, LABELS), load=_scaled(2.0))
    _run_counted(tmp_path, cache=directory, **first)
    _, called = _run_counted(tmp_path, cache=directory, **first)
    assert called == []  # the same source and load: read, not loaded (so the rebuild below is not vacuous)

    second = {**first, **STALE[change]}
    cached, called = _run_counted(tmp_path, cache=directory, **second)
    plain, _ = _run_counted(tmp_path, cache=None, **second)
    assert cached == plain
    assert sorted(called) == list(range(len(second["sources"][0])))  # each sample loaded anew, once


def test_moving_load_in_its_file_keeps_the_cache():
    from prefetch.cache.identity import fingerprint

    load = _scaled(2.0)
    moved = type(load)(
        load.__code__.replace(co_firstlineno=load.__code__.co_firstlineno + 40),
        load.__globals__,
        load.__name__,
        load.__defaults__,
        load.__closure__,
    )
    moved.__qualname__ = load.__qualname__  # Python 3.10 names a function made this way by co_name alone
    assert fingerprint((IMAGES,), load) == fingerprint((IMAGES,), moved)
    assert fingerprint((IMAGES,), load) != fingerprint((IMAGES,), _scaled(2.5))


# --- the options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        (dict(cache=5), TypeError, "cache must be None, 'memory' or a directory"),
        (dict(cache_bytes=100), ValueError, "cache_bytes=100 limits a cache"),
        (dict(cache="memory", cache_bytes=-1), ValueError, "cache_bytes must be an int >= 0"),
        (dict(load=3), TypeError, "load must be a callable or None"),
    ],
)
def test_bad_cache_options_fail_at_construction(options, error, words):
    with pytest.raises(error, match=words):
        prefetch.Loader(IMAGES, batch_size=BATCH, **options)


def test_a_file_is_not_a_cache_directory(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a directory")
    with pytest.raises(ValueError, match="is a file: pass a directory"):
        prefetch.Loader(IMAGES, batch_size=BATCH, cache=str(path))


def test_ray_refuses_a_memory_cache_before_importing_ray():
    words = r"cache='memory'.*pass cache=<a directory"
    with (
        prefetch.Loader(IMAGES, batch_size=BATCH, workers=1, cache="memory") as loader,
        pytest.raises(ValueError, match=words),
    ):
        prefetch.RayExecutor().start(loader.config, 0, None)


def test_a_load_result_pickle_cannot_write_is_a_type_error_naming_load(tmp_path):
    unpicklable = lambda sample: lambda: sample  # noqa: E731 -- a lambda inside: pickle refuses it
    with (
        prefetch.Loader(IMAGES, batch_size=BATCH, workers=0, load=unpicklable, cache="memory") as loader,
        pytest.raises(TypeError, match="cache= keeps what load returns, pickled, and this sample cannot be pickled"),
    ):
        next(iter(loader))


def test_a_rebuild_removes_only_the_caches_own_files(tmp_path):
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / "s1.txt").write_text("the user's")
    (directory / "t2-notes").write_text("the user's")
    _run_counted(tmp_path, sources=(IMAGES, LABELS), load=_scaled(2.0), cache=str(directory))
    _, called = _run_counted(tmp_path, sources=(IMAGES, LABELS), load=_shifted, cache=str(directory))
    assert sorted(called) == list(range(N))  # rebuilt
    assert (directory / "s1.txt").read_text() == (directory / "t2-notes").read_text() == "the user's"


def test_an_entry_cut_short_is_loaded_again_not_read(tmp_path):
    directory = tmp_path / "cache"
    _run_counted(tmp_path, sources=(IMAGES, LABELS), load=_scaled(2.0), cache=str(directory))
    entry = directory / "s5"
    entry.write_bytes(entry.read_bytes()[:-7])  # as a power loss before the disk had it all would leave it
    cached, called = _run_counted(tmp_path, sources=(IMAGES, LABELS), load=_scaled(2.0), cache=str(directory))
    plain, _ = _run_counted(tmp_path, sources=(IMAGES, LABELS), load=_scaled(2.0), cache=None)
    assert cached == plain
    assert called == [5]
