"""The conformance suite's workload and the reference every executor is held to.

The workload: ``N`` samples ``(x, label)`` in batches of ``BATCH_SIZE`` over ``EPOCHS`` epochs, shuffled
with ``SEED``; the first epoch ends inside batch ``N // BATCH_SIZE``, so one batch straddles the two
epochs. ``draw_everywhere`` draws from ``random``, ``np.random`` and ``prefetch.batch_rng()``, ``shift``
from ``np.random`` after collation (``OPTIONS``); ``WITH_TORCH`` also draws from torch's global generator
where torch is installed. The reference of each is its stream with ``workers=0``.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import numpy as np
from draws import draw_everywhere, shift
from helpers import hash_into
from torchdraws import draw_with_torch

import prefetch

N = 50
BATCH_SIZE = 8
SEED = 2024
EPOCHS = 2
DATA_X = np.random.default_rng(5).random((N, 3)).astype(np.float32)
LABELS = np.arange(N)


# The loader options of the workload (the executor's own are added by the registry).
OPTIONS: dict[str, Any] = {
    "batch_size": BATCH_SIZE,
    "seed": SEED,
    "epochs": EPOCHS,
    "transform": draw_everywhere,
    "batch_transform": shift,
}
# The same with torch's draws too (its workers import torch: seconds each under spawn).
WITH_TORCH: dict[str, Any] = {**OPTIONS, "transform": draw_with_torch}
_WORKLOADS = {"plain": OPTIONS, "torch": WITH_TORCH}


def digest(batch: Any) -> str:
    """A SHA-256 of a batch's structure, dtypes, shapes and bytes."""
    h = hashlib.sha256()

    hash_into(h, batch)
    return h.hexdigest()


@functools.cache
def reference(workload: str = "plain") -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """The digests and the labels of every batch of the stream with ``workers=0`` of ``OPTIONS``
    (``"plain"``) or ``WITH_TORCH`` (``"torch"``)."""
    with prefetch.Loader(DATA_X, LABELS, workers=0, **_WORKLOADS[workload]) as loader:
        batches = list(loader.stream())
    return tuple(digest(b) for b in batches), tuple(tuple(b[1].tolist()) for b in batches)


def batch_of(sample: int) -> int:
    """The first batch of the reference stream that holds ``sample``."""
    return next(number for number, labels in enumerate(reference()[1]) if sample in labels)
