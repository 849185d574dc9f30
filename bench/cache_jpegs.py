"""The JPEG pipeline split for decode-once (``load=`` / ``cache=``): ``jpeg_decode`` is the deterministic part
(decode, then a fixed resize to a short side of ``DECODED_SIDE``), ``jpeg_crop_flip`` the random part
(RandomResizedCrop(224) of the decoded image, flip half of them). ``cache_stream`` is the loader of one system
of ``bench/test_cache.py``, in the shape ``e2e._jpeg_stream`` returns: ``(batches, closer)``.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from typing import Any

import numpy as np
from jpegs import CACHE_DIR, CROP, JPEG_BATCH, jpeg_labels, random_resized_crop, write_jpegs

# The decoded image's short side: ImageNet's usual resize before a 224 crop. Smaller than the 500x400 file, so a
# cached sample (256x320x3 uint8, 240 KiB) is cheaper to keep and to read back than the full decode.
DECODED_SIDE = 256
# The systems: the split pipeline without a cache (the baseline of the ratio), and with each cache.
SYSTEMS = {"prefetch-split": None, "prefetch-cache-memory": "memory", "prefetch-cache-dir": "dir"}


def jpeg_decode(sample: tuple[str, int]) -> tuple[np.ndarray, int]:
    """Decode one file and resize it to a short side of DECODED_SIDE: ``(uint8 HWC image, label)``."""
    from PIL import Image

    path, label = sample
    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        scale = DECODED_SIDE / min(width, height)
        size = (round(width * scale), round(height * scale))
        return np.asarray(image.resize(size, Image.Resampling.BILINEAR)), int(label)


def jpeg_crop_flip(sample: tuple[np.ndarray, int]) -> tuple[np.ndarray, int]:
    """RandomResizedCrop(224) of a decoded image, flipped half of the time (Python's ``random``)."""
    from PIL import Image

    pixels, label = sample
    image = Image.fromarray(pixels)
    box = random_resized_crop(*image.size)
    image = image.resize((CROP, CROP), Image.Resampling.BILINEAR, box=box)
    if random.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image), label


def cache_stream(system: str, workers: int, options: dict[str, Any]) -> tuple[Any, Any]:
    """``(batches, closer)``: prefetch over the JPEG files with ``load=jpeg_decode, transform=jpeg_crop_flip``
    and the system's cache (a directory: a fresh one under the bench cache, removed by the closer)."""
    import prefetch

    paths = write_jpegs()
    labels = jpeg_labels(len(paths))
    cache = SYSTEMS[system]
    directory = None
    if cache == "dir":
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        directory = cache = tempfile.mkdtemp(prefix="decoded-", dir=CACHE_DIR)
    if workers >= 0:
        options = {"workers": workers, **options}
    loader = prefetch.Loader(
        paths, labels, batch_size=JPEG_BATCH, seed=0, load=jpeg_decode, transform=jpeg_crop_flip, cache=cache, **options
    )
    gen = loader.stream()

    def close() -> None:
        gen.close()
        loader.close()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    return gen, close
