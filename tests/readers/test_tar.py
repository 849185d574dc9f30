"""prefetch.TarShards: WebDataset tar shards as a map-style source, indexed from their headers."""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile
import threading
import warnings

import numpy as np
import pytest
from shardhelpers import decode, resumed_digests, sample_shards, stream_digests, write_tar

import prefetch
from prefetch.readers import tar as tar_module
from prefetch.readers import tarindex

LONG_DIRECTORY = "d" * 120  # past ustar's 100-byte name field: GNU long-name blocks, pax path records


@pytest.fixture
def layouts(tmp_path) -> list[str]:
    """Shards in every layout the readers must follow as webdataset does."""
    odd = {"dir/": tarfile.DIRTYPE, "link.jpg": tarfile.SYMTYPE}
    return [
        write_tar(
            tmp_path / "a.tar",
            [
                ("a.jpg", b"j" * 700),
                ("a.cls", b"1"),
                ("dir/", b""),  # a directory in the middle of a sample: skipped, the sample goes on
                ("a.seg.png", b"mask"),
                ("dir/b.JPG", b"upper"),  # extensions are lower-cased
                ("dir/b.json", b"{}"),
                ("__meta__", b"skipped"),
                ("__meta__/x.txt", b"skipped too"),
                ("noextension", b"skipped"),
                ("link.jpg", b""),
                ("a.b.c/d.txt", b"dots in a directory"),
                (f"{LONG_DIRECTORY}/e.txt", b"GNU long name"),
                ("a.txt", b"a key seen before, not consecutive: a new sample"),
            ],
            kinds=odd,
        ),
        write_tar(tmp_path / "empty.tar", []),
        write_tar(tmp_path / "one.tar", [("only.cls", b"7")]),
        write_tar(tmp_path / "pax.tar", [(f"{LONG_DIRECTORY}/ü.jpg", b"p" * 1025), ("z.txt", b"")], tarfile.PAX_FORMAT),
        write_tar(tmp_path / "ustar.tar", [("p" * 90 + "/" + "q" * 90 + ".bin", b"prefix")], tarfile.USTAR_FORMAT),
    ]


def webdataset_samples(paths: list[str]) -> list[dict]:
    wds = pytest.importorskip("webdataset")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its shardshuffle and empty-check notices
        samples = list(wds.WebDataset(paths, shardshuffle=False, empty_check=False))
    for sample in samples:
        sample.pop("__local_path__", None)  # the same path as __url__ for a local file: not yielded by TarShards
    return samples


def test_samples_are_webdatasets_own(layouts):
    shards = prefetch.TarShards(layouts)
    ours = [shards[i] for i in range(len(shards))]
    theirs = webdataset_samples(layouts)
    assert ours == theirs
    assert [list(s) for s in ours] == [list(s) for s in theirs]  # the same fields in the same order
    assert len(shards) == 9  # a: 5 samples, empty: 0, one: 1, pax: 2, ustar: 1


def test_samples_hold_the_members_bytes(layouts):
    """Without webdataset: every field is the member tarfile extracts under the key and extension."""
    shards = prefetch.TarShards(layouts)
    extracted = {}
    for path in layouts:
        with tarfile.open(path) as archive:
            for info in archive.getmembers():
                if info.isreg():
                    extracted[(path, info.name.lower())] = archive.extractfile(info).read()
    for i in range(len(shards)):
        sample = shards[i]
        for field, data in sample.items():
            if not field.startswith("__"):
                assert extracted[(sample["__url__"], f"{sample['__key__']}.{field}".lower())] == data
    assert shards[-1] == shards[len(shards) - 1] and shards[np.int64(0)] == shards[0]
    with pytest.raises(IndexError):
        shards[len(shards)]


def test_the_index_reads_headers_not_data(tmp_path, monkeypatch):
    big = 1 << 20
    path = write_tar(tmp_path / "big.tar", [(f"{k}.{e}", bytes([k]) * big) for k in range(8) for e in ("a", "b")])
    read = []
    real_pread = os.pread
    monkeypatch.setattr(tarindex.os, "pread", lambda fd, n, offset: read.append(n) or real_pread(fd, n, offset))
    shards = prefetch.TarShards([path])
    monkeypatch.undo()
    assert len(shards) == 8 and shards[5]["b"] == bytes([5]) * big
    assert sum(read) <= 17 * tarindex.HEADER_READ_BYTES  # one read per member header (16) and the end block
    assert sum(read) < os.path.getsize(path) / 100


def test_many_shards_are_indexed_in_threads_that_end_with_the_constructor(tmp_path, monkeypatch):
    paths = sample_shards(tmp_path, shards=6, per_shard=3)
    threads = set()
    real = tarindex.index_shard
    spy = lambda path: threads.add(threading.current_thread().name) or real(path)  # noqa: E731
    monkeypatch.setattr(tar_module, "index_shard", spy)
    before = threading.active_count()
    shards = prefetch.TarShards(paths)
    assert threading.active_count() == before  # no thread left running for a later fork to copy
    assert all(name.startswith("prefetch-index") for name in threads)
    assert [shards[i]["__key__"] for i in range(len(shards))] == [f"s{k // 3}/{k:05d}" for k in range(18)]


def test_it_pickles_small_without_its_open_files(tmp_path):
    paths = sample_shards(tmp_path, shards=3, per_shard=200)
    shards = prefetch.TarShards(paths)
    first = shards[0]  # opens shard 0 in this process
    blob = pickle.dumps(shards)
    assert len(blob) < 40 * len(shards) + 1000  # paths and index arrays: tens of bytes per sample, no data
    copy = pickle.loads(blob)
    assert len(copy._opened) == 0
    assert copy[0] == first and [copy[i] for i in range(len(copy))] == [shards[i] for i in range(len(shards))]


@pytest.mark.timeout(30)
def test_a_forked_child_opens_its_own_files(tmp_path):
    shards = prefetch.TarShards(sample_shards(tmp_path, shards=1, per_shard=4))
    shards[0]
    # held, not its id(): the child drops its copy of the parent's files, and a file it opens next could then
    # be made at the freed address (an equal id) although it is its own
    parents = shards._opened.get(0)
    assert parents is not None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: read, then say whether it used the parent's open file
        try:
            sample = shards[1]
            mine = shards._opened.pid == os.getpid() and shards._opened.get(0) is not parents
            os.write(write_end, b"own" if mine and sample["__key__"] == "s0/00001" else b"parent's")
        finally:
            os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 16)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert answer == b"own"


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_streams_equal_for_any_workers_and_start_method(tmp_path, start_method, workers):
    paths = sample_shards(tmp_path)
    shards = prefetch.TarShards(paths)
    expected = stream_digests(shards, workers=0, transform=decode)
    assert len(expected) == 2 * 13  # 100 samples: 13 batches an epoch
    assert stream_digests(shards, workers=workers, start_method=start_method, transform=decode) == expected


def test_resume_mid_epoch_gives_the_rest_of_the_stream(tmp_path):
    shards = prefetch.TarShards(sample_shards(tmp_path))
    whole = stream_digests(shards, workers=2, transform=decode)
    assert resumed_digests(shards, 5, workers=2, transform=decode) == whole[5:]
    assert resumed_digests(shards, 17, workers=1, transform=decode) == whole[17:]


def corrupt_header(path: str, member: int) -> None:
    """Flip a byte of the name in the header of the ``member``-th member (its checksum no longer matches)."""
    with tarfile.open(path) as archive:
        offset = archive.getmembers()[member].offset
    with open(path, "r+b") as file:
        file.seek(offset + 3)
        byte = file.read(1)
        file.seek(offset + 3)
        file.write(bytes([byte[0] ^ 0x20]))


def test_a_corrupt_header_names_the_shard_and_where(tmp_path):
    paths = sample_shards(tmp_path, shards=2, per_shard=5)
    corrupt_header(paths[1], 4)  # the first member of the third sample
    with pytest.raises(prefetch.ShardError, match="checksum") as raised:
        prefetch.TarShards(paths)
    assert raised.value.path == paths[1]
    assert paths[1] in str(raised.value) and "'s1/00006'" in str(raised.value)  # the last sample read whole


def test_a_truncated_shard_names_the_member_and_its_key(tmp_path):
    (path,) = sample_shards(tmp_path, shards=1, per_shard=5)
    with tarfile.open(path) as archive:
        cut = archive.getmember("s0/00003.bin").offset_data + 10
    os.truncate(path, cut)
    with pytest.raises(prefetch.ShardError, match="truncated") as raised:
        prefetch.TarShards([path])
    assert raised.value.key == "s0/00003" and "s0/00003.bin" in str(raised.value) and path in str(raised.value)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "empty file"),
        (gzip.compress(b"x" * 2000), "gzip-compressed"),
        (b"not a tar archive at all" * 40, "not a tar file"),
    ],
)
def test_a_file_that_is_not_an_uncompressed_tar_is_refused(tmp_path, content, words):
    good = sample_shards(tmp_path, shards=1, per_shard=2)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(content)
    with pytest.raises(prefetch.ShardError, match=words) as raised:
        prefetch.TarShards([*good, bad])
    assert raised.value.path == str(bad)


def test_two_members_with_one_extension_in_a_sample_are_refused(tmp_path):
    path = write_tar(tmp_path / "dup.tar", [("k.jpg", b"1"), ("k.JPG", b"2")])
    with pytest.raises(prefetch.ShardError, match="two members with extension 'jpg'"):
        prefetch.TarShards([path])


def rewrite(path: str, how: str) -> None:
    """Change a shard after it was indexed: replaced by a file of the same size, grown, or truncated."""
    with open(path, "rb") as file:
        data = file.read()
    stat = os.stat(path)
    if how == "replaced":
        with open(path + ".new", "wb") as file:
            file.write(data)
        os.utime(path + ".new", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        os.replace(path + ".new", path)
    elif how == "grown":
        with open(path, "ab") as file:
            file.write(b"\0" * 512)
    else:
        os.truncate(path, len(data) - 1024)


@pytest.mark.parametrize("how", ["replaced", "grown", "truncated"])
def test_a_shard_changed_since_the_index_is_detected(tmp_path, how):
    paths = sample_shards(tmp_path, shards=2, per_shard=5)
    shards = prefetch.TarShards(paths)
    rewrite(paths[1], how)
    assert shards[4]["__key__"] == "s0/00004"  # an unchanged shard reads on
    with pytest.raises(prefetch.ShardError, match="changed since the TarShards index was built") as raised:
        shards[7]
    assert raised.value.path == paths[1] and raised.value.index == 7 and "sample 7" in str(raised.value)


def test_a_shard_changed_under_a_worker_reaches_the_consumer_as_shard_error(tmp_path):
    paths = sample_shards(tmp_path, shards=2, per_shard=5)
    shards = prefetch.TarShards(paths)
    rewrite(paths[1], "truncated")
    with prefetch.Loader(shards, batch_size=5, shuffle=False, workers=2, epochs=1) as loader:
        batches = iter(loader)
        assert next(batches)["__key__"][0] == "s0/00000"
        with pytest.raises(prefetch.ShardError, match="changed since") as raised:
            next(batches)
    assert raised.value.path == paths[1] and raised.value.index == 5


def test_a_shard_cut_while_open_names_the_sample_and_key(tmp_path):
    (path,) = sample_shards(tmp_path, shards=1, per_shard=5)
    shards = prefetch.TarShards([path])
    shards[0]  # opened, its stamp checked: the cut comes after
    with tarfile.open(path) as archive:
        cut = archive.getmember("s0/00004.cls").offset_data
    os.truncate(path, cut)
    with pytest.raises(prefetch.ShardError, match="truncated") as raised:
        shards[4]
    assert (raised.value.index, raised.value.key, raised.value.path) == (4, "s0/00004", path)


def test_bad_arguments_say_what_to_change(tmp_path):
    with pytest.raises(TypeError, match="sequence of shard paths"):
        prefetch.TarShards(str(tmp_path / "a.tar"))
    with pytest.raises(prefetch.ShardError, match="cannot be opened"):
        prefetch.TarShards([tmp_path / "missing.tar"])
