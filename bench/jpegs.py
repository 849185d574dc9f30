"""The JPEG files of the end-to-end workloads, and the augmentation every system runs on them.

``write_jpegs`` writes photo-like JPEGs once (under ``PREFETCH_BENCH_CACHE``); ``jpeg_augment`` decodes one,
takes a RandomResizedCrop(224) and flips half of them. ``e2e.py`` reads them as files, ``e2e_shards.py``
packs them into tar shards first: both stand on this module, neither on the other's internals.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np

CACHE_DIR = Path(os.environ.get("PREFETCH_BENCH_CACHE", "/tmp/prefetch-bench"))

JPEG_COUNT = 1280  # 20 batches an epoch: the runs cross epoch boundaries, as training does
JPEG_SIZE = (500, 400)  # width, height
JPEG_QUALITY = 90
JPEG_BATCH = 64
CROP = 224


def write_jpegs(count: int = JPEG_COUNT) -> list[str]:
    """Write ``count`` photo-like JPEGs (smooth gradients, shapes and noise) once; return their paths."""
    from PIL import Image, ImageDraw

    folder = CACHE_DIR / f"jpeg-v2-{count}-{JPEG_SIZE[0]}x{JPEG_SIZE[1]}-q{JPEG_QUALITY}"
    paths = [str(folder / f"{i:05d}.jpg") for i in range(count)]
    if all(os.path.exists(p) for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2026)
    width, height = JPEG_SIZE
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i, path in enumerate(paths):
        base = rng.uniform(0, 255, 3).astype(np.float32)
        slope = rng.uniform(-0.4, 0.4, (2, 3)).astype(np.float32)
        pixels = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
        pixels += rng.normal(0, 28, pixels.shape).astype(np.float32)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            box = (x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200)))
            draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        tmp = path + f".{os.getpid()}.tmp"
        image.save(tmp, format="JPEG", quality=JPEG_QUALITY)
        os.replace(tmp, path)
        del i
    return paths


def random_resized_crop(width: int, height: int) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (scale 0.08-1, ratio 3/4-4/3), drawn with Python's ``random``."""
    area = width * height
    for _ in range(10):
        target = area * random.uniform(0.08, 1.0)
        ratio = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = random.randint(0, width - w)
            top = random.randint(0, height - h)
            return left, top, left + w, top + h
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2


def jpeg_augment(sample: tuple[str, int]) -> tuple[np.ndarray, int]:
    """Decode one file, RandomResizedCrop to 224x224, flip half of them: ``(uint8 HWC image, label)``."""
    from PIL import Image

    path, label = sample
    with Image.open(path) as image:
        image = image.convert("RGB")
        box = random_resized_crop(*image.size)
        image = image.resize((CROP, CROP), Image.Resampling.BILINEAR, box=box)
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(image), label


def jpeg_labels(count: int) -> np.ndarray:
    return np.arange(count, dtype=np.int64) % 10
