"""Transforms that draw from torch's global random generator, as torchvision's random transforms do.

torch is imported at the top, as in user code: a spawned process that unpickles one of these imports
torch before it makes a batch. Import this module only after ``pytest.importorskip("torch")``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from helpers import hash_into

# Images for the crop-and-flip transform: 40 of 12x12 RGB, uint8 (small; the stream has 10 batches).
IMAGES = np.random.default_rng(7).integers(0, 256, (40, 12, 12, 3), dtype=np.uint8)
CROP = 8


def torch_draws(sample: Any) -> tuple[Any, np.ndarray, np.ndarray]:
    """The sample with two ``torch.rand`` floats and three ``torch.randint`` integers."""
    return sample, torch.rand(2).numpy(), torch.randint(0, 1000, (3,)).numpy()


def random_crop_flip(image: np.ndarray) -> np.ndarray:
    """torchvision's RandomCrop + RandomHorizontalFlip, written with torch ops on the image as a CHW
    tensor: the crop's offset from ``torch.randint``, the flip from ``torch.rand``."""
    chw = torch.tensor(image).permute(2, 0, 1)  # a copy: a source may be read-only (Ray's object store)
    height, width = chw.shape[1:]
    top = int(torch.randint(0, height - CROP + 1, size=(1,)))
    left = int(torch.randint(0, width - CROP + 1, size=(1,)))
    chw = chw[:, top : top + CROP, left : left + CROP]
    if float(torch.rand(1)) < 0.5:
        chw = chw.flip(-1)
    return chw.contiguous().numpy()


def every_generator(sample: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """Sixteen draws from each global generator a transform may use (torch, np.random, random), each the
    low 31 bits of an MT19937 output word: ``torch.randint(0, 2**31)`` keeps those of every other word,
    the two others draw whole words (``randint(0, 2**32)``, ``getrandbits(32)``) and drop the top bit."""
    low31 = 2**31 - 1
    from_torch = torch.randint(0, 2**31, (16,)).numpy()
    from_numpy = (np.random.randint(0, 2**32, 16, dtype=np.uint64) & low31).astype(np.int64)
    from_random = np.array([random.getrandbits(32) & low31 for _ in range(16)], dtype=np.int64)
    return sample, from_torch, from_numpy, from_random


def torch_items(count: int) -> Iterable[np.ndarray]:
    """A plain generator drawing from torch (for ``prefetch.background``)."""
    for _ in range(count):
        yield torch.rand(4).numpy()


def make_torch_items() -> Iterable[np.ndarray]:
    """A zero-argument function returning that generator (what ``background`` pickles under spawn)."""
    return torch_items(12)


def sha256_of(batches: Iterable[Any]) -> str:
    """One SHA-256 over a whole stream: every batch's structure, dtypes, shapes and bytes."""
    h = hashlib.sha256()

    count = 0
    for batch in batches:
        hash_into(h, batch)
        count += 1
    h.update(f"batches={count}".encode())
    return h.hexdigest()
