"""``python -m prefetch demo``: the seed's example, then a CPU-heavy pipeline timed against the plain generator."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ._budget import process_cpus
from .loader import Loader, data_generator


def plain_data_generator(
    batch_size: int, data_x: Any, data_y: Any, shuffle: bool = True, transform: Any = None
) -> Iterator[Any]:
    """The seed's generator, with an optional per-sample transform done inline."""
    data_size = len(data_x)
    index_list = [*range(data_size)]
    if shuffle:
        random.shuffle(index_list)
    index = 0
    while True:
        batch_x, batch_y = [], []
        for _ in range(batch_size):
            if index >= data_size:
                index = 0
                if shuffle:
                    random.shuffle(index_list)
            x, y = data_x[index_list[index]], data_y[index_list[index]]
            if transform is not None:
                x, y = transform((x, y))
            batch_x.append(x)
            batch_y.append(y)
            index += 1
        yield np.stack(batch_x), np.array(batch_y)


def augment(sample: tuple[np.ndarray, int]) -> tuple[np.ndarray, int]:
    """A CPU-heavy augmentation: random crop, flip, brightness, and a 5x5 box blur, in float32."""
    image, label = sample
    # NumPy's global generator: the plain generator leaves it unseeded, prefetch seeds it per batch.
    top, left = np.random.randint(0, 9, size=2)
    crop = image[top : top + 56, left : left + 56].astype(np.float32) / 255.0
    if np.random.random() < 0.5:
        crop = crop[:, ::-1]
    crop = crop * np.float32(np.random.uniform(0.8, 1.2))
    blurred = np.zeros_like(crop)
    for dy in range(5):
        for dx in range(5):
            blurred[2:-2, 2:-2] += crop[dy : dy + 52, dx : dx + 52]
    return blurred / np.float32(25.0), label


# The README's quick start prints these batches too (tests/test_demo.py holds them to it).
ALPHABET_SEED = 0
ALPHABET_BATCH_SIZE = 3
ALPHABET_BATCHES = 3


def alphabet() -> None:
    """The seed's example, exactly as the README's quick start runs it, with the same output."""
    print(
        f"1. The seed's example: prefetch.data_generator(batch_size={ALPHABET_BATCH_SIZE}, data_x=X, data_y=Y, "
        f"shuffle=True, seed={ALPHABET_SEED})\n"
    )
    x = [chr(i) for i in range(ord("a"), ord("a") + 26)]
    y = [chr(i) for i in range(ord("A"), ord("A") + 26)]
    gen = data_generator(batch_size=ALPHABET_BATCH_SIZE, data_x=x, data_y=y, shuffle=True, seed=ALPHABET_SEED)
    for _ in range(ALPHABET_BATCHES):
        print(f"   {next(gen)}")
    gen.close()
    print("\n   The same batches for any number of workers: the order is a function of the seed.")


def pipeline(batches: int = 120, batch_size: int = 32) -> None:
    workers = process_cpus()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2048, 64, 64, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=2048)
    print(f"\n2. A CPU-heavy augmentation pipeline: {batches} batches of {batch_size} images 64x64x3,")
    print("   random crop + flip + brightness + 5x5 blur per image, on", workers, "core(s)\n")

    plain = plain_data_generator(batch_size, images, labels, transform=augment)
    next(plain)
    started = time.perf_counter()
    for _ in range(batches):
        next(plain)
    plain_s = time.perf_counter() - started
    print(f"   plain generator:          {batches * batch_size / plain_s:8.0f} samples/s")

    with Loader(images, labels, batch_size=batch_size, transform=augment, workers=workers) as loader:
        batch_iter = loader.stream()  # the batches may be more than an epoch
        next(batch_iter)
        started = time.perf_counter()
        for _ in range(batches):
            next(batch_iter)
        fast_s = time.perf_counter() - started
        stats = loader.stats()
    print(f"   prefetch, {workers} worker(s):    {batches * batch_size / fast_s:8.0f} samples/s")
    print(f"\n   speed-up: {plain_s / fast_s:.2f}x (ideal on this machine: {workers}x)\n")
    print("   loader.stats():")
    print("   " + str(stats).replace("\n", "\n   "))


def main() -> None:
    alphabet()
    pipeline()
