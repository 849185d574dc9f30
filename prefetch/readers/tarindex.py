"""The index of one tar shard in WebDataset layout, built from its headers alone.

``index_shard(path)`` walks the member headers -- ustar, GNU (long names: ``L`` blocks) and pax (``x``
records: ``path``, ``size``) -- seeking over member data, and groups the members into samples by the rules
of the ``webdataset`` package (``tariterators``), so that sample ``k`` of the shard is the ``k``-th sample
``webdataset`` yields from it:

* only regular files count (directories, links and the like are skipped), and so do names that are metadata
  (``__name__``, or a first component ``__name__/``);
* a name splits into key and extension at the first dot of its last component: ``dir/a.b/c.seg.png`` has key
  ``dir/a.b/c`` and extension ``seg.png`` (lower-cased); a name with no dot there is skipped;
* consecutive members with the same key are one sample; the end of a shard ends a sample. Two members of one
  sample with the same extension are an error, as in ``webdataset``.

The parser is stricter than ``tarfile``'s random-access mode, which ends an archive silently at a corrupt
header: here a bad checksum, a header cut short or a member whose data runs past the end of the file is a
``ShardError`` naming the shard, the byte offset and the member. A shard that ends at a member boundary
without its two zero blocks is complete (as for ``tar`` and ``tarfile``). Compressed archives cannot be read
by offset and are refused. See docs/design.md, "Readers".
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ..errors import ShardError

BLOCK_BYTES = 512
# Bytes read per visit to a header while indexing. One read then covers the header and, for small members
# (labels, JSON), the next headers too; for large members (images) it reads up to this much data that is not
# needed. 8 KiB: two pages, a fraction of one JPEG, and few enough reads for a shard of small members.
HEADER_READ_BYTES = 8192
# The largest GNU long-name or pax record block accepted: a corrupt size field must not become a huge read.
META_MAX_BYTES = 1 << 20

REGULAR = (b"0", b"\0", b"7")  # tarfile's regular types (a sparse member, "S", is refused)
NAME_BLOCKS = (b"L", b"K")  # GNU long name / long link name: the data is the next header's name / link
PAX_BLOCKS = (b"x", b"X")  # per-member pax records (X: Solaris)
GNU_TYPES = (b"L", b"K", b"S")
SIGNED = struct.Struct("148b8x356b")  # the header's bytes as signed, less the checksum field
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}

# webdataset's rules (tariterators.base_plus_ext, tar_file_iterator's skip_meta and meta prefix/suffix)
KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
META = re.compile(r"__[^/]*__($|/)")
RESERVED = ("__key__", "__url__")  # fields of the sample dict itself: an extension may not take them


class Corrupt(Exception):
    """A header that cannot be parsed; ``index_shard`` and the reader turn it into a ``ShardError``."""


class Member(NamedTuple):
    name: str
    kind: bytes  # the type flag
    header: int  # offset of its first header block (a long-name or pax block when it has one)
    data: int  # offset of its data
    size: int  # bytes of data

    @property
    def end(self) -> int:
        """Where the next member's header starts."""
        return self.data + _blocks(self.size)


def _blocks(size: int) -> int:
    return -(-size // BLOCK_BYTES) * BLOCK_BYTES


def _text(field: bytes) -> str:
    end = field.find(b"\0")
    return (field if end == -1 else field[:end]).decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (first byte 0x80, or 0xff for negative)."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise Corrupt(f"a numeric header field holds {bytes(field)!r} (not a tar file, or corrupt)") from None


def _checksum_ok(block: bytes) -> bool:
    """The header's checksum: the sum of its bytes with the checksum field as spaces (some old writers summed
    signed bytes: accepted too, as tarfile does)."""
    recorded = _number(block[148:156])
    if recorded == 256 + sum(block[:148]) + sum(block[156:]):
        return True
    return recorded == 256 + sum(SIGNED.unpack_from(block))


def _pax_records(payload: bytes) -> dict[str, str]:
    """pax extended-header records, ``"<length> <key>=<value>\\n"`` each."""
    records: dict[str, str] = {}
    position = 0
    while position < len(payload) and payload[position] != 0:
        space = payload.find(b" ", position)
        try:
            length = int(payload[position:space])
        except ValueError:
            raise Corrupt("a pax record has no length") from None
        if space < 0 or length <= 0 or position + length > len(payload):
            raise Corrupt("a pax record runs past its block")
        key, equals, value = payload[space + 1 : position + length - 1].partition(b"=")
        if not equals:
            raise Corrupt("a pax record has no '='")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def read_member(read: Callable[[int, int], bytes], offset: int) -> Member | None:
    """The member whose header blocks start at ``offset``, or None at the end of the archive (a zero block,
    or the end of the file). ``read(offset, n)`` returns up to ``n`` bytes of the shard from ``offset``."""
    header = offset
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        block = read(offset, BLOCK_BYTES)
        if not block or (offset == header and block.count(0) == BLOCK_BYTES):
            if long_name is not None or pax:
                raise Corrupt("the archive ends after a long-name or pax block, before its member")
            return None
        if len(block) < BLOCK_BYTES:
            raise Corrupt(f"a header is cut short: {len(block)} of {BLOCK_BYTES} bytes")
        if not _checksum_ok(block):
            raise Corrupt("a header's checksum does not match (not a tar file, or corrupt)")
        kind, size = block[156:157], _number(block[124:136])
        data = offset + BLOCK_BYTES
        if kind in NAME_BLOCKS or kind in PAX_BLOCKS or kind == b"g":
            if not 0 <= size <= META_MAX_BYTES:
                raise Corrupt(f"a long-name or pax block claims {size} bytes")
            payload = read(data, size)
            if len(payload) < size:
                raise Corrupt("a long-name or pax block is cut short")
            if kind == b"L":
                long_name = _text(payload)
            elif kind in PAX_BLOCKS:
                pax.update(_pax_records(payload))
            elif kind == b"g" and {"path", "size"} & set(_pax_records(payload)):
                raise Corrupt("a pax global header sets 'path' or 'size' for every member (not supported)")
            offset = data + _blocks(size)
            continue
        name = _text(block[0:100])
        prefix = _text(block[345:500])
        if prefix and kind not in GNU_TYPES:
            name = f"{prefix}/{name}"
        if long_name is not None:
            name = long_name
        name = pax.get("path", name)
        if "size" in pax:
            size = int(pax["size"])
        if size < 0:
            raise Corrupt(f"a member claims {size} bytes")
        return Member(name, kind, header, data, size)


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name, or None when the member is not part of a sample (webdataset's
    rules, module docstring)."""
    if ("/" not in name and name.startswith("__") and name.endswith("__")) or META.match(name):
        return None
    match = KEY_AND_EXTENSION.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


class ShardIndex(NamedTuple):
    """One shard's samples: per sample, where its first header starts and its first member; per member, where
    its data is, its size, and its extension (a number into ``extensions``)."""

    sample_header: np.ndarray  # int64, one per sample
    sample_member: np.ndarray  # int64, one per sample plus one: members of sample k are [m[k], m[k + 1])
    member_data: np.ndarray  # int64
    member_size: np.ndarray  # int64
    member_extension: np.ndarray  # int32, into extensions
    extensions: list[str]
    stamp: tuple[int, int]  # (size, mtime_ns) when indexed


class _Window:
    """Reads of a shard through one buffer of ``HEADER_READ_BYTES``: consecutive headers of small members
    cost one read."""

    def __init__(self, fd: int):
        self._fd = fd
        self._start = 0
        self._buffer = b""

    def read(self, offset: int, count: int) -> bytes:
        position = offset - self._start
        if position < 0 or position + count > len(self._buffer):
            self._buffer = os.pread(self._fd, max(count, HEADER_READ_BYTES), offset)
            self._start, position = offset, 0
        return self._buffer[position : position + count]


def index_shard(path: str) -> ShardIndex:
    """Index one shard: read its headers (module docstring), never its members' data."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ShardError(f"shard {path!r} cannot be opened: {exc.strerror or exc}", path=path) from exc
    try:
        status = os.fstat(fd)
        return _walk(path, _Window(fd).read, status.st_size, (status.st_size, status.st_mtime_ns))
    finally:
        os.close(fd)


def _refuse_what_is_not_a_tar(path: str, read: Callable[[int, int], bytes], file_size: int) -> None:
    if file_size == 0:
        raise ShardError(
            f"shard {path!r} is an empty file (0 bytes), not a tar archive (a copy that failed?); "
            "a shard without samples is a tar with no members",
            path=path,
        )
    head = read(0, 6)
    for magic, kind in COMPRESSED.items():
        if head.startswith(magic):
            raise ShardError(
                f"shard {path!r} is a {kind}-compressed tar: samples are read by offset, which needs an "
                "uncompressed tar. Decompress the shards (their images and audio are compressed already)",
                path=path,
            )


class _Samples:
    """Members grouped into samples as they come (module docstring), in the lists ``ShardIndex`` is made of."""

    def __init__(self, path: str):
        self.path = path
        self.headers: list[int] = []
        self.first_members: list[int] = []
        self.data: list[int] = []
        self.sizes: list[int] = []
        self.extension_ids: list[int] = []
        self.extensions: dict[str, int] = {}
        self.key: str | None = None
        self._in_sample: set[str] = set()

    def add(self, member: Member, key: str, extension: str) -> None:
        if key != self.key:
            self.key, self._in_sample = key, set()
            self.headers.append(member.header)
            self.first_members.append(len(self.data))
        if extension in self._in_sample or extension in RESERVED:
            raise ShardError(
                f"shard {self.path!r}: sample {key!r} has two members with extension {extension!r} "
                f"(the second is {member.name!r}); webdataset refuses it too",
                path=self.path,
                key=key,
            )
        self._in_sample.add(extension)
        self.data.append(member.data)
        self.sizes.append(member.size)
        self.extension_ids.append(self.extensions.setdefault(extension, len(self.extensions)))

    def index(self, stamp: tuple[int, int]) -> ShardIndex:
        return ShardIndex(
            np.array(self.headers, np.int64),
            np.array([*self.first_members, len(self.data)], np.int64),
            np.array(self.data, np.int64),
            np.array(self.sizes, np.int64),
            np.array(self.extension_ids, np.int32),
            list(self.extensions),
            stamp,
        )


def _walk(path: str, read: Callable[[int, int], bytes], file_size: int, stamp: tuple[int, int]) -> ShardIndex:
    _refuse_what_is_not_a_tar(path, read, file_size)
    samples = _Samples(path)
    offset = 0
    while True:
        try:
            member = read_member(read, offset)
        except Corrupt as exc:
            count = len(samples.headers)
            where = f"after sample {count - 1} (key {samples.key!r})" if count else "before its first sample"
            raise ShardError(f"shard {path!r} is corrupt at byte {offset}, {where}: {exc}", path=path) from None
        if member is None:
            return samples.index(stamp)
        offset = member.end
        if member.kind == b"S":
            raise ShardError(f"shard {path!r}: member {member.name!r} is a sparse file (not supported)", path=path)
        parts = split_name(member.name) if member.kind in REGULAR else None
        if parts is None:
            continue
        if member.data + member.size > file_size:
            raise ShardError(
                f"shard {path!r} is truncated: member {member.name!r} (key {parts[0]!r}, sample "
                f"{len(samples.headers) - (parts[0] == samples.key)} of the shard) needs bytes up to "
                f"{member.data + member.size}, the file has {file_size}",
                path=path,
                key=parts[0],
            )
        samples.add(member, *parts)
