"""``TarShards``: WebDataset tar shards as a map-style source -- ``len`` samples, ``src[i]`` read by offset.

Built once from the shards' headers (``tarindex``: a few numbers per sample and member, in numpy arrays,
no member data read); reading sample ``i`` is one ``pread`` of its members, which are consecutive in their
shard. So any order works -- a global shuffle, a block shuffle, a resume mid-epoch with any number of
workers -- with nothing but the index. See docs/design.md, "Readers".
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable
from typing import Any, NoReturn

import numpy as np

from ..errors import ShardError
from . import _shards
from .tarindex import Corrupt, ShardIndex, index_shard, read_member, split_name

# Shards kept open per process. A global shuffle visits shards at random, so with more shards than this most
# samples pay an open, an fstat and a close (about 5 us on a local disk, a round trip on a network file
# system); each open shard costs a descriptor (the usual soft limit is 1024 per process).
OPEN_SHARDS = 128


class TarShards:
    """WebDataset tar shards as a map-style source: ``len(src)`` samples, ``src[i]`` a dict.

    ``src[i]`` is ``{"__key__": key, "__url__": path, ext: bytes, ...}`` -- the dict the ``webdataset`` package
    yields for the same sample, one entry per member (``"jpg"``, ``"cls"``, ``"seg.png"``), the bytes as
    stored (decode them in ``transform``). Samples are numbered shard by shard, in the order of ``paths``,
    each shard's in archive order.

    The index is built here, in parallel over the shards, from their headers alone; the shards must not
    change afterwards (a changed shard is detected when it is opened: ``ShardError``). Shards must be
    uncompressed tars on a file system (local disk, NFS, a FUSE mount of object storage).

    Example::

        shards = prefetch.TarShards(sorted(glob.glob("train-*.tar")))
        loader = prefetch.Loader(shards, batch_size=64, transform=decode_and_crop, seed=0)
    """

    def __init__(self, paths: Iterable[str | os.PathLike[str]]):
        self.paths: list[str] = _shards.as_paths(paths, "TarShards")
        indexes: list[ShardIndex] = _shards.in_parallel(index_shard, self.paths)
        extensions: dict[str, int] = {}
        remapped = []
        for index in indexes:  # one table of extensions for all shards
            table = np.array([extensions.setdefault(e, len(extensions)) for e in index.extensions] or [0], np.int64)
            remapped.append(table[index.member_extension])
        self.extensions: list[str] = list(extensions)
        self._starts = _shards.starts_of(len(index.sample_header) for index in indexes)
        member_starts = _shards.starts_of(len(index.member_data) for index in indexes)
        sample_member = [i.sample_member[:-1] + start for i, start in zip(indexes, member_starts)]
        compact, none = _shards.compact, np.zeros(0, np.int64)
        self._sample_header = compact(np.concatenate([none, *(i.sample_header for i in indexes)]))
        self._sample_member = compact(np.concatenate([none, *sample_member, member_starts[-1:]]))
        self._member_data = compact(np.concatenate([none, *(i.member_data for i in indexes)]))
        self._member_size = compact(np.concatenate([none, *(i.member_size for i in indexes)]))
        self._member_extension = compact(np.concatenate([none, *remapped]))
        self._stamps = [index.stamp for index in indexes]
        self._length = int(self._starts[-1])
        self._opened = self._new_opened()

    def _new_opened(self) -> _shards.Opened[io.FileIO]:
        return _shards.Opened(OPEN_SHARDS, self._open)

    def _open(self, shard: int) -> io.FileIO:
        path = self.paths[shard]
        try:
            file = io.FileIO(path, "r")
        except OSError as exc:
            raise ShardError(f"shard {path!r} cannot be opened: {exc.strerror or exc}", path=path) from exc
        with contextlib.ExitStack() as on_error:
            on_error.callback(file.close)
            status = os.fstat(file.fileno())
            _shards.check_stamp(path, self._stamps[shard], (status.st_size, status.st_mtime_ns), "TarShards")
            on_error.pop_all()
        return file

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: Any) -> dict[str, Any]:
        shard, i = _shards.locate(self._starts, index, self._length)
        first, stop = int(self._sample_member[i]), int(self._sample_member[i + 1])
        start = int(self._sample_header[i])
        end = int(self._member_data[stop - 1]) + int(self._member_size[stop - 1])
        path = self.paths[shard]
        try:
            file = self._opened.get(shard)
        except ShardError as exc:
            raise _shards.naming_sample(exc, i) from None
        try:
            buffer = os.pread(file.fileno(), end - start, start)
        except OSError as exc:
            raise ShardError(
                f"shard {path!r}: sample {i} could not be read: {exc.strerror or exc}", path=path, index=i
            ) from exc
        key = self._key(buffer, start, first, path, i)
        if len(buffer) < end - start:
            self._fail(path, i, key, f"the file ends at byte {start + len(buffer)}, inside the sample (truncated)")
        sample: dict[str, Any] = {"__key__": key, "__url__": path}
        view = memoryview(buffer)
        for member in range(first, stop):
            offset = int(self._member_data[member]) - start
            extension = self.extensions[self._member_extension[member]]
            sample[extension] = bytes(view[offset : offset + int(self._member_size[member])])
        return sample

    def _key(self, buffer: bytes, start: int, first: int, path: str, i: int) -> str:
        """The sample's key, from its first member's header, read with the data (the index keeps no names).
        A header that is not where the index says, or not the member it recorded, means the shard changed."""
        try:
            member = read_member(lambda offset, count: buffer[offset - start : offset - start + count], start)
        except Corrupt as exc:
            self._fail(path, i, None, f"the header at byte {start}: {exc}")
        parts = split_name(member.name) if member is not None else None
        if member is None or parts is None or member.data != int(self._member_data[first]):
            self._fail(path, i, None, f"the header at byte {start} is not the member the index recorded")
        return parts[0]

    @staticmethod
    def _fail(path: str, i: int, key: str | None, problem: str) -> NoReturn:
        named = f"sample {i}" + (f" (key {key!r})" if key is not None else "")
        raise ShardError(
            f"shard {path!r}: {named} cannot be read: {problem}. The shard is corrupt or changed since the "
            "index was built: build TarShards(paths) again",
            path=path,
            index=i,
            key=key,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_opened"]  # this process's open files: the receiver opens its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._opened = self._new_opened()

    def __repr__(self) -> str:
        return f"TarShards({len(self.paths)} shards, {self._length} samples, extensions {self.extensions})"
