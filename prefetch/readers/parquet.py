"""``ParquetRows``: the rows of Parquet files as a map-style source, read by row group with pyarrow.

Built from the files' footers alone (row groups and their row counts; no data read). ``src[i]`` decodes the
row group holding row ``i`` -- the smallest unit Parquet can decode -- and keeps the last
``cached_groups`` decoded row groups per process, so rows read near each other in time from the same row
group cost about a microsecond each, and a row whose group is not cached costs decoding its whole group.
Order the samples so that a batch's rows share row groups (a block shuffle with blocks of about a row
group) or keep row groups small. pyarrow is imported when a ``ParquetRows`` is made or read, never by
``import prefetch`` (``pip install "prefetch[parquet]"``). See docs/design.md, "Readers".
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import ShardError
from . import _shards

# Decoded row groups kept per process. A row group of Parquet's usual size (64-128 MiB) decodes to about as
# much again, per worker: two let a batch that straddles two row groups decode each once.
ROW_GROUPS_CACHED = 2
# Parquet files kept open per process (each holds a descriptor and its parsed footer).
OPEN_FILES = 16


def _parquet() -> Any:
    try:
        import pyarrow.parquet
    except ImportError as exc:
        raise ImportError('ParquetRows needs pyarrow: pip install "prefetch[parquet]" (or pyarrow)') from exc
    return pyarrow.parquet


def _footer(path: str) -> tuple[list[int], Any, tuple[int, int]]:
    """Rows per row group, the Arrow schema and the stamp of one file, from its footer."""
    pq = _parquet()
    recorded = _shards.stamp(path)
    try:
        with pq.ParquetFile(path) as file:
            metadata = file.metadata
            rows = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            return rows, file.schema_arrow, recorded
    except ShardError:
        raise
    except Exception as exc:  # pyarrow's ArrowInvalid, OSError: not a Parquet file, a cut footer
        raise ShardError(f"shard {path!r} is not a readable Parquet file: {exc}", path=path) from exc


class ParquetRows:
    """The rows of Parquet files as one source: ``len`` rows, ``src[i]`` a dict ``{column: value}``.

    Rows are numbered file by file, in the order of ``paths``. ``columns`` selects and orders the columns
    (default: all of the first file's). Values are what ``pyarrow``'s ``to_pylist()`` gives: ints, floats,
    strings, bytes, lists, dicts. Every file must have the selected columns with the same types.

    Each process decodes the row groups it reads and keeps the last ``cached_groups`` of them: see the module
    docstring for what that means for the order.

    Example::

        rows = prefetch.ParquetRows(sorted(glob.glob("train-*.parquet")), columns=["image", "label"])
        loader = prefetch.Loader(rows, batch_size=64, transform=decode, seed=0)
    """

    def __init__(
        self,
        paths: Iterable[str | os.PathLike[str]],
        columns: Sequence[str] | None = None,
        *,
        cached_groups: int = ROW_GROUPS_CACHED,
    ):
        self.paths: list[str] = _shards.as_paths(paths, "ParquetRows")
        if isinstance(columns, str):
            raise TypeError(f"columns takes a list of column names, not one name; pass columns=[{columns!r}]")
        if not isinstance(cached_groups, int) or cached_groups < 1:
            raise ValueError(f"cached_groups must be an int >= 1 (row groups kept per process); got {cached_groups!r}")
        footers = _shards.in_parallel(_footer, self.paths)
        self.columns: list[str] = self._check_columns(columns, footers)
        self.cached_groups = cached_groups
        groups = [(f, g) for f, (rows, _, _) in enumerate(footers) for g in range(len(rows))]
        self._group_starts = _shards.starts_of(n for rows, _, _ in footers for n in rows)
        self._group_file = _shards.compact(np.array([f for f, _ in groups], np.int64))
        self._group_number = _shards.compact(np.array([g for _, g in groups], np.int64))
        self._stamps = [stamp for _, _, stamp in footers]
        self._length = int(self._group_starts[-1])
        self._opened, self._decoded = self._new_caches()

    def _check_columns(self, columns: Sequence[str] | None, footers: list[tuple[list[int], Any, Any]]) -> list[str]:
        if not footers:
            return list(columns or [])
        first = footers[0][1]
        names = list(columns) if columns is not None else list(first.names)
        missing = [name for name in names if name not in first.names]
        if missing:
            raise ValueError(f"columns {missing} are not in {self.paths[0]!r}; its columns are {first.names}")
        for path, (_, schema, _) in zip(self.paths[1:], footers[1:]):
            for name in names:
                if name not in schema.names or schema.field(name).type != first.field(name).type:
                    found = schema.field(name).type if name in schema.names else "no such column"
                    raise ShardError(
                        f"shard {path!r}: column {name!r} is {found}, in {self.paths[0]!r} it is "
                        f"{first.field(name).type}: every file must have the selected columns with the same types",
                        path=path,
                    )
        return names

    def _new_caches(self) -> tuple[_shards.Opened[Any], _shards.Opened[dict[str, Any]]]:
        return _shards.Opened(OPEN_FILES, self._open), _shards.Opened(self.cached_groups, self._decode)

    def _open(self, file: int) -> Any:
        path = self.paths[file]
        _shards.check_stamp(path, self._stamps[file], _shards.stamp(path), "ParquetRows")
        try:
            return _parquet().ParquetFile(path)
        except Exception as exc:
            raise ShardError(f"shard {path!r} cannot be opened as Parquet: {exc}", path=path) from exc

    def _decode(self, group: int) -> dict[str, Any]:
        """Row group ``group`` (numbered over all files), decoded: a column of numbers, booleans or times as
        a Python list (shared by every read: its values are immutable); strings, bytes and nested values as
        the Arrow array, each value made anew per read (no second copy of large values, nothing shared that a
        transform could change)."""
        import pyarrow as pa

        file = int(self._group_file[group])
        table = self._opened.get(file).read_row_group(
            int(self._group_number[group]), columns=self.columns, use_threads=False
        )
        decoded: dict[str, Any] = {}
        for name in self.columns:
            column = table.column(name).combine_chunks()
            kind = column.type
            flat = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
            flat = flat or pa.types.is_temporal(kind) or pa.types.is_decimal(kind) or pa.types.is_null(kind)
            decoded[name] = column.to_pylist() if flat else column
        return decoded

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: Any) -> dict[str, Any]:
        group, i = _shards.locate(self._group_starts, index, self._length)
        try:
            decoded = self._decoded.get(group)
        except ShardError as exc:
            raise _shards.naming_sample(exc, i) from None
        except Exception as exc:  # pyarrow's errors for a corrupt page, a short read
            file = int(self._group_file[group])
            path = self.paths[file]
            raise ShardError(
                f"shard {path!r}: row group {int(self._group_number[group])} (holding sample {i}) cannot be "
                f"decoded: {type(exc).__name__}: {exc}. The file is corrupt, or changed since the index was built",
                path=path,
                index=i,
            ) from exc
        row = i - int(self._group_starts[group])
        return {name: values[row] if type(values) is list else values[row].as_py() for name, values in decoded.items()}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_opened"], state["_decoded"]  # this process's files and rows: the receiver reads its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._opened, self._decoded = self._new_caches()

    def __repr__(self) -> str:
        return f"ParquetRows({len(self.paths)} files, {self._length} rows, columns {self.columns})"
