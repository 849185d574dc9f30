"""Loads and streams the cache tests share (module level: importable by spawned processes)."""

from __future__ import annotations

import hashlib
import os
import random
import select

import numpy as np

import prefetch

N = 64  # samples
BATCH = 4  # 16 batches an epoch: with shuffle=False and prefetch=2, a sample's epochs never overlap in flight
IMAGES = np.arange(N * 6 * 5 * 3, dtype=np.uint8).reshape(N, 6, 5, 3)
LABELS = np.arange(N, dtype=np.int64)


class CountingLoad:
    """A deterministic "decode" that appends the index of every call to ``log`` (one line per call, any process)."""

    def __init__(self, log: str, scale: float = 1.5):
        self.log = log
        self.scale = scale

    def __call__(self, sample):
        image, label = sample
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{int(label)}\n".encode())  # one write of a few bytes: lines never interleave
        finally:
            os.close(fd)
        return np.repeat(image, 2, axis=0).astype(np.float32) * np.float32(self.scale), int(label)


def calls(log: str) -> list[int]:
    """The indices ``CountingLoad`` was called for, in call order."""
    if not os.path.exists(log):
        return []
    with open(log) as file:
        return [int(line) for line in file]


def crop_flip(sample):
    """The random part: a random crop offset and a flip, drawn from Python's and NumPy's global generators."""
    image, label = sample
    top = random.randint(0, 2)
    image = image[top : top + 8]
    if np.random.rand() < 0.5:
        image = image[:, ::-1]
    return np.ascontiguousarray(image), label


def stream_digest(epochs: int = 2, **options) -> str:
    """SHA-256 over every batch's bytes of an ``epochs``-epoch stream of (IMAGES, LABELS)."""
    digest = hashlib.sha256()
    options.setdefault("transform", crop_flip)
    with prefetch.Loader(IMAGES, LABELS, batch_size=BATCH, seed=7, epochs=epochs, **options) as loader:
        for images, labels in loader.stream():
            digest.update(images.tobytes())
            digest.update(labels.tobytes())
    return digest.hexdigest()


class KilledMidWrite(CountingLoad):
    """``CountingLoad``; in a worker, the first write of entry ``index`` stops before its rename (the moment
    a torn entry could be seen), sends the worker's pid down ``pipe`` and waits there to be killed.
    ``fired`` (a file made with O_EXCL) makes it happen once: the redone batch's worker writes normally."""

    def __init__(self, log: str, index: int, pipe: int, fired: str):
        super().__init__(log)
        self.index, self.pipe, self.fired = index, pipe, fired

    def __call__(self, sample):
        if int(sample[1]) == self.index:
            try:
                os.close(os.open(self.fired, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                _block_the_next_rename(self.pipe)
        return super().__call__(sample)


def _block_the_next_rename(pipe: int) -> None:
    """In this process only: the store's next ``os.rename`` (its entry written whole under a temporary name)
    reports this pid on ``pipe`` and blocks until the process is killed."""
    import prefetch.cache.store as store

    class Blocking:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def rename(source, target):
            os.write(pipe, f"{os.getpid()} {source} {target}\n".encode())
            select.select([], [], [])  # forever: the test kills this process here

    store.os = Blocking()


def double(sample):
    """A deterministic ``load`` for the conformance workload's ``(x, label)`` samples."""
    x, label = sample
    return x * np.float32(2), label
