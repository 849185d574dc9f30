"""prefetch.NpyShards: .npy files as one array along the first axis, mapped where they are read."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from shardhelpers import resumed_digests, stream_digests

import prefetch

ROWS = (7, 0, 1, 12)  # an empty shard and a shard of one row among them


@pytest.fixture
def npy_shards(tmp_path) -> list[str]:
    paths = []
    start = 0
    for k, rows in enumerate(ROWS):
        path = str(tmp_path / f"part-{k}.npy")
        np.save(path, (np.arange(rows * 6, dtype=np.float32) + start * 6).reshape(rows, 2, 3))
        paths.append(path)
        start += rows
    return paths


def test_rows_are_the_concatenated_arrays(npy_shards):
    shards = prefetch.NpyShards(npy_shards)
    whole = np.concatenate([np.load(path) for path in npy_shards])
    assert len(shards) == len(whole) == sum(ROWS)
    assert all(np.array_equal(shards[i], whole[i]) for i in range(len(whole)))
    assert np.array_equal(shards[-1], whole[-1]) and type(shards[3]) is np.ndarray
    assert not shards[0].flags.writeable  # a view of a read-only mapping, as an np.memmap source's row
    assert shards.dtype == np.float32 and shards.row_shape == (2, 3)


def test_fortran_order_and_big_endian_shards(tmp_path):
    a = np.asfortranarray(np.arange(24, dtype=">i4").reshape(4, 6))
    np.save(tmp_path / "f.npy", a)
    np.save(tmp_path / "g.npy", np.arange(12, dtype=">i4").reshape(2, 6))
    shards = prefetch.NpyShards([tmp_path / "f.npy", tmp_path / "g.npy"])
    assert [shards[i].tolist() for i in range(6)] == np.concatenate([a, np.arange(12).reshape(2, 6)]).tolist()


def test_only_headers_are_read_at_construction(npy_shards, monkeypatch):
    mapped = []
    real = np.memmap.__new__
    monkeypatch.setattr(np.memmap, "__new__", lambda cls, *a, **k: mapped.append(a[0]) or real(cls, *a, **k))
    shards = prefetch.NpyShards(npy_shards)
    assert mapped == []  # nothing mapped until a row is read
    shards[7]  # the one row of the third shard (the second is empty)
    assert mapped == [npy_shards[2]]


def test_it_pickles_small(tmp_path):
    path = tmp_path / "big.npy"
    np.save(path, np.zeros((1000, 256), np.uint8))
    shards = prefetch.NpyShards([path])
    shards[0]
    assert len(pickle.dumps(shards)) < 2000
    assert np.array_equal(pickle.loads(pickle.dumps(shards))[999], np.zeros(256, np.uint8))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_streams_equal_for_any_workers_and_start_method(npy_shards, start_method, workers):
    shards = prefetch.NpyShards(npy_shards)
    expected = stream_digests(shards, workers=0, batch_size=4)
    assert len(expected) == 2 * 5
    assert stream_digests(shards, workers=workers, start_method=start_method, batch_size=4) == expected


def test_resume_mid_epoch(npy_shards):
    shards = prefetch.NpyShards(npy_shards)
    assert resumed_digests(shards, 3, workers=2, batch_size=4) == stream_digests(shards, workers=2, batch_size=4)[3:]


def test_shards_that_do_not_match_are_refused(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((2, 4), np.float32))
    np.save(tmp_path / "c.npy", np.zeros((2, 3), np.float64))
    for other in ("b.npy", "c.npy"):
        with pytest.raises(prefetch.ShardError, match="every shard must match") as raised:
            prefetch.NpyShards([tmp_path / "a.npy", tmp_path / other])
        assert raised.value.path == str(tmp_path / other)


def test_truncated_object_and_foreign_files_are_refused(tmp_path):
    np.save(tmp_path / "cut.npy", np.zeros((10, 10), np.float64))
    os.truncate(tmp_path / "cut.npy", os.path.getsize(tmp_path / "cut.npy") - 8)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "text.npy").write_text("not numpy")
    np.save(tmp_path / "scalar.npy", np.float32(1))
    for name, words in [("cut", "truncated"), ("objects", "Python objects"), ("text", "not a .npy"), ("scalar", "0-d")]:
        with pytest.raises(prefetch.ShardError, match=words) as raised:
            prefetch.NpyShards([tmp_path / f"{name}.npy"])
        assert raised.value.path == str(tmp_path / f"{name}.npy")


def test_a_shard_changed_since_the_index_is_detected(npy_shards):
    shards = prefetch.NpyShards(npy_shards)
    np.save(npy_shards[3], np.zeros((12, 2, 3), np.float32) + 1)  # same shape, new data, new mtime
    os.utime(npy_shards[3], ns=(0, os.stat(npy_shards[3]).st_mtime_ns + 10**9))
    assert shards[0].tolist() == np.load(npy_shards[0])[0].tolist()
    with pytest.raises(prefetch.ShardError, match="changed since the NpyShards index") as raised:
        shards[9]
    assert raised.value.path == npy_shards[3] and raised.value.index == 9
