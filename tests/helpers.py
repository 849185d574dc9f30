"""Module-level sources and transforms the tests share (importable by spawned processes)."""

from __future__ import annotations

import os
import random

import numpy as np

import prefetch

ALPHABET_X = [chr(i) for i in range(ord("a"), ord("a") + 26)]
ALPHABET_Y = [chr(i) for i in range(ord("A"), ord("A") + 26)]


def augment(sample):
    """Uses all three sources of randomness a transform may use."""
    x, y = sample
    noise = random.random() + np.random.rand() + prefetch.batch_rng().random()
    return x * np.float32(noise), y


def batch_noise(batch):
    x, y = batch
    return x + np.random.randint(0, 100), y


def as_list(batch) -> list:
    """A comparable form of any batch (arrays become lists)."""
    if isinstance(batch, np.ndarray):
        return batch.tolist()
    if isinstance(batch, dict):
        return {k: as_list(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [as_list(v) for v in batch]
    return batch


class CountingSource:
    """A source that appends one byte to a file per sample loaded (works across processes)."""

    def __init__(self, n: int, path: str):
        self.n = n
        self.path = path

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
        return np.full(4, i, dtype=np.int64)

    def loaded(self) -> int:
        return os.path.getsize(self.path) if os.path.exists(self.path) else 0


class DictSource:
    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> dict:
        return {"image": np.full((2, 3), i, dtype=np.uint8), "name": f"s{i}", "pair": (i, float(i) / 2)}


class Unpicklable(Exception):
    """An exception that cannot be rebuilt in another process."""

    def __init__(self, message: str, handle: object):
        super().__init__(message)
        self.handle = handle

    def __reduce__(self):
        raise TypeError("not picklable")


def fail_at(index: int, kind: str, marker: str | None = None):
    """A transform that misbehaves on one sample: raise, die, hang or raise something unpicklable.

    With ``marker``, it misbehaves only while the marker file does not exist and creates
    it first -- so the fault happens once and a retry succeeds.
    """

    def transform(sample):
        x, y = sample
        if int(y) == index and (marker is None or not os.path.exists(marker)):
            if marker is not None:
                open(marker, "w").close()
            if kind == "raise":
                raise KeyError(f"bad sample {index}")
            if kind == "unpicklable":
                raise Unpicklable("cannot travel", lambda: None)
            if kind == "sigkill":
                os.kill(os.getpid(), 9)
            if kind == "exit":
                os._exit(3)
            if kind == "hang":
                import time

                time.sleep(3600)
        return x, y

    return transform


class RandomCropSource:
    """A PyTorch-style dataset whose ``__getitem__`` itself draws random numbers."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> np.ndarray:
        return np.full(3, i, dtype=np.float64) + np.random.rand(3) + random.random()
