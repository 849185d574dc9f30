"""Shards written by the tests of prefetch's readers (tests/readers), and what those tests run on them.

Top-level functions here pickle by reference, so spawned processes import them.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
from helpers import fingerprint

import prefetch


def write_tar(path, members, format=tarfile.GNU_FORMAT, kinds=None) -> str:
    """A tar at ``path`` whose members are ``(name, bytes)`` in order; ``kinds`` maps a name to a tar type
    (``tarfile.DIRTYPE``, ``tarfile.SYMTYPE``) for members that are not regular files."""
    kinds = kinds or {}
    with tarfile.open(path, "w", format=format) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.type = kinds.get(name, tarfile.REGTYPE)
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            info.mtime = 1_700_000_000
            archive.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return str(path)


def sample_shards(directory, shards: int = 4, per_shard: int = 25, payload: int = 300) -> list[str]:
    """``shards`` tar shards of ``per_shard`` samples (a ``bin`` of ``payload`` bytes and a ``cls``); sample
    ``k`` of the data set has key ``s{shard}/{k:05d}`` and bytes derived from ``k``."""
    paths = []
    k = 0
    for shard in range(shards):
        members = []
        for _ in range(per_shard):
            data = np.random.default_rng(k).integers(0, 256, payload, dtype=np.uint8).tobytes()
            members += [(f"s{shard}/{k:05d}.bin", data), (f"s{shard}/{k:05d}.cls", str(k % 10).encode())]
            k += 1
        paths.append(write_tar(os.path.join(directory, f"shard-{shard}.tar"), members))
    return paths


def decode(sample: dict) -> tuple[np.ndarray, int, str]:
    """A transform over a TarShards sample that draws from the global generator (seeded per batch)."""
    pixels = np.frombuffer(sample["bin"], np.uint8).astype(np.float32)
    return pixels + np.float32(np.random.rand()), int(sample["cls"]), sample["__key__"]


def row_transform(row: dict) -> tuple:
    """A transform over a ParquetRows / datasets row: its values, and a draw from the global generator."""
    return (*(row[name] for name in sorted(row)), float(np.random.rand()))


def stream_digests(source, **options) -> list[str]:
    """The SHA-256 of every batch of a loader over ``source`` (its ``epochs``), in order."""
    settings = {"batch_size": 8, "epochs": 2, "seed": 11, "last_batch": "short", **options}
    with prefetch.Loader(source, **settings) as loader:
        return [hashlib.sha256(pickle.dumps(fingerprint(batch))).hexdigest() for batch in loader.stream()]


def resumed_digests(source, taken: int, **options) -> list[str]:
    """The digests of the batches after the first ``taken``: ``taken`` batches from one loader, then a new loader
    resumed from its ``state_dict()``."""
    settings = {"batch_size": 8, "epochs": 2, "seed": 11, "last_batch": "short", **options}
    with prefetch.Loader(source, **settings) as first:
        stream = first.stream()
        for _ in range(taken):
            next(stream)
        state = first.state_dict()
        stream.close()
    with prefetch.Loader(source, **settings) as second:
        second.load_state_dict(state)
        return [hashlib.sha256(pickle.dumps(fingerprint(batch))).hexdigest() for batch in second.stream()]


class TableKind:
    """A source over a Hugging Face ``Dataset`` whose samples say what kind of Arrow table the process reading them
    holds: in a worker, whether the data set arrived memory-mapped or as a copy of its rows."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, str]:
        return self.dataset[i]["id"], type(self.dataset.data).__name__
