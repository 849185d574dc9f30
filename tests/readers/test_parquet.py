"""prefetch.ParquetRows: the rows of Parquet files, read by row group with pyarrow (an optional extra)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from shardhelpers import resumed_digests, row_transform, stream_digests

import prefetch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

FILE_ROWS = (23, 0, 1, 40)  # row groups of 10 rows: 3 + 0 + 1 + 4 groups
GROUP_ROWS = 10


@pytest.fixture
def parquet_files(tmp_path) -> list[str]:
    paths = []
    start = 0
    for k, rows in enumerate(FILE_ROWS):
        numbers = list(range(start, start + rows))
        table = pa.table(
            {
                "id": pa.array(numbers, pa.int64()),
                "score": pa.array([n / 7 for n in numbers], pa.float64()),
                "name": pa.array([f"row {n}" for n in numbers], pa.string()),
                "blob": pa.array([bytes([n % 256]) * (n % 5) for n in numbers], pa.binary()),
                "tags": pa.array([[n, n + 1][: n % 3] for n in numbers], pa.list_(pa.int32())),
                "maybe": pa.array([None if n % 4 == 0 else n for n in numbers], pa.int16()),
            }
        )
        path = str(tmp_path / f"part-{k}.parquet")
        pq.write_table(table, path, row_group_size=GROUP_ROWS)
        paths.append(path)
        start += rows
    return paths


def pyarrows_rows(paths, columns=None) -> list[dict]:
    return [row for path in paths for row in pq.read_table(path, columns=columns).to_pylist()]


@pytest.mark.parametrize("columns", [None, ["tags", "id"], ["name"]])
def test_rows_are_pyarrows_own(parquet_files, columns):
    rows = prefetch.ParquetRows(parquet_files, columns=columns)
    expected = pyarrows_rows(parquet_files, columns)
    assert len(rows) == len(expected) == sum(FILE_ROWS)
    ours = [rows[i] for i in range(len(rows))]
    assert ours == expected
    assert [list(row) for row in ours] == [list(row) for row in expected]  # columns in the order asked
    assert rows[-1] == expected[-1]


def test_rows_do_not_share_mutable_values_with_the_cache(parquet_files):
    rows = prefetch.ParquetRows(parquet_files, columns=["tags"])
    rows[2]["tags"].append(99)  # a transform that changes its sample in place
    assert rows[2]["tags"] == [2, 3][: 2 % 3]


def test_each_row_group_is_decoded_once_when_read_in_order(parquet_files, monkeypatch):
    rows = prefetch.ParquetRows(parquet_files)
    decoded = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, **k: decoded.append(g) or real(self, g, **k))
    for i in range(len(rows)):
        rows[i]
    assert len(decoded) == 3 + 1 + 4
    decoded.clear()
    for i in (0, 15, 1, 16, 2):  # two row groups in turn: both stay decoded (cached_groups=2)
        rows[i]
    assert decoded == [0, 1]


def test_the_footers_are_read_not_the_data(parquet_files, monkeypatch):
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda *a, **k: pytest.fail("read data"))
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read data"))
    assert len(prefetch.ParquetRows(parquet_files)) == sum(FILE_ROWS)


def test_it_pickles_small(parquet_files):
    rows = prefetch.ParquetRows(parquet_files)
    rows[30]
    blob = pickle.dumps(rows)
    assert len(blob) < 3000
    assert pickle.loads(blob)[30] == rows[30]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_streams_equal_for_any_workers_and_start_method(parquet_files, start_method, workers):
    rows = prefetch.ParquetRows(parquet_files, columns=["id", "name", "tags"])
    expected = stream_digests(rows, workers=0, transform=row_transform)
    assert len(expected) == 2 * 8
    assert stream_digests(rows, workers=workers, start_method=start_method, transform=row_transform) == expected


def test_resume_mid_epoch(parquet_files):
    rows = prefetch.ParquetRows(parquet_files)
    whole = stream_digests(rows, workers=2, transform=row_transform)
    assert resumed_digests(rows, 6, workers=2, transform=row_transform) == whole[6:]


@pytest.mark.parametrize("damage", ["not parquet", "truncated"])
def test_a_file_that_is_not_parquet_is_named(parquet_files, tmp_path, damage):
    bad = tmp_path / "bad.parquet"
    if damage == "truncated":  # a copy that stopped early: the footer is gone
        bad.write_bytes(Path(parquet_files[0]).read_bytes()[:-100])
    else:
        bad.write_bytes(b"PAR1 but not really" * 10)
    with pytest.raises(prefetch.ShardError, match="not a readable Parquet file") as raised:
        prefetch.ParquetRows([*parquet_files, bad])
    assert raised.value.path == str(bad)


def test_corrupt_data_names_the_file_the_row_group_and_the_sample(parquet_files):
    path = parquet_files[3]
    rows = prefetch.ParquetRows(parquet_files)
    column = pq.ParquetFile(path).metadata.row_group(2).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    with open(path, "r+b") as file:  # garble the first column chunk of row group 2, keeping size and mtime
        stat = os.fstat(file.fileno())
        file.seek(start)
        file.write(b"\xff" * column.total_compressed_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(prefetch.ShardError, match="row group 2") as raised:
        rows[24 + 25]  # file 3 starts at row 24; its row group 2 holds its rows 20-29
    assert raised.value.path == path and raised.value.index == 49 and "sample 49" in str(raised.value)


def test_a_file_changed_since_the_index_is_detected(parquet_files):
    rows = prefetch.ParquetRows(parquet_files)
    pq.write_table(pa.table({"id": [1]}), parquet_files[0])
    with pytest.raises(prefetch.ShardError, match="changed since the ParquetRows index") as raised:
        rows[3]
    assert raised.value.path == parquet_files[0] and raised.value.index == 3


def test_columns_must_exist_and_agree(parquet_files, tmp_path):
    with pytest.raises(ValueError, match=r"\['nope'\] are not in"):
        prefetch.ParquetRows(parquet_files, columns=["id", "nope"])
    with pytest.raises(TypeError, match="list of column names"):
        prefetch.ParquetRows(parquet_files, columns="id")
    other = str(tmp_path / "other.parquet")
    pq.write_table(pa.table({"id": pa.array(["a"], pa.string())}), other)
    with pytest.raises(prefetch.ShardError, match="same types") as raised:
        prefetch.ParquetRows([parquet_files[0], other], columns=["id"])
    assert raised.value.path == other


def test_import_prefetch_does_not_import_pyarrow():
    code = "import sys, prefetch; prefetch.ParquetRows; sys.exit('pyarrow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
