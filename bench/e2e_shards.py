"""The JPEG workload of ``e2e.py`` from WebDataset tar shards: ``prefetch.TarShards`` against ``webdataset``.

The same JPEG files (``jpegs.write_jpegs``) are packed once into tar shards of ``SHARD_SAMPLES`` samples
(``{key}.jpg``, ``{key}.cls``), and the same per-sample work runs on them: Pillow decode, RandomResizedCrop to
224, a flip. Two systems, selected by ``e2e._jpeg_stream`` when the system's name is one of ``SYSTEMS``:

* ``prefetch-tar``: ``prefetch.Loader(prefetch.TarShards(shards), transform=...)`` -- a global shuffle over every
  sample of every shard (options such as ``shuffle="block", block_size=SHARD_SAMPLES`` pass through), an exact
  resume at any batch;
* ``webdataset``: ``wds.WebDataset(shards, shardshuffle=...).shuffle(SHUFFLE_BUFFER).decode("pilrgb")`` with the
  crop and flip in ``.map``, batched by ``torch.utils.data.DataLoader(num_workers=workers)`` -- shard order
  shuffled, samples shuffled within a buffer, no resume.

``bench/test_e2e_shards.py`` runs them interleaved, in fresh processes, through ``e2e.compare``.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path
from typing import Any

import jpegs
import numpy as np

SHARD_SAMPLES = 128  # samples per shard: 10 shards for the 1280 JPEGs
# webdataset's shuffle buffer, in samples (its documentation's examples use 1000-5000): with 2 workers of
# 640 samples each, 1000 holds every sample a worker will read.
SHUFFLE_BUFFER = 1000
SYSTEMS = ("prefetch-tar", "webdataset")


def write_shards(count: int = jpegs.JPEG_COUNT) -> list[str]:
    """Pack the JPEGs of ``jpegs.write_jpegs(count)`` into tar shards once; return the shard paths."""
    files = jpegs.write_jpegs(count)
    labels = jpegs.jpeg_labels(count)
    folder = Path(files[0]).parent.with_name(Path(files[0]).parent.name + f"-tar{SHARD_SAMPLES}")
    paths = [str(folder / f"shard-{k:04d}.tar") for k in range(-(-count // SHARD_SAMPLES))]
    if all(os.path.exists(p) for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    for k, path in enumerate(paths):
        tmp = path + f".{os.getpid()}.tmp"
        with tarfile.open(tmp, "w") as archive:
            for i in range(k * SHARD_SAMPLES, min(count, (k + 1) * SHARD_SAMPLES)):
                archive.add(files[i], arcname=f"{i:05d}.jpg")
                label = str(int(labels[i])).encode()
                info = tarfile.TarInfo(f"{i:05d}.cls")
                info.size = len(label)
                archive.addfile(info, io.BytesIO(label))
        os.replace(tmp, path)
    return paths


def crop_and_flip(image: Any) -> np.ndarray:
    """``jpegs.jpeg_augment``'s work on a decoded RGB image: RandomResizedCrop(224), a flip half of the time."""
    from PIL import Image

    box = jpegs.random_resized_crop(*image.size)
    image = image.resize((jpegs.CROP, jpegs.CROP), Image.Resampling.BILINEAR, box=box)
    if random.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image)


def tar_augment(sample: dict[str, Any]) -> tuple[np.ndarray, int]:
    """A ``TarShards`` sample -> ``(uint8 HWC image, label)``: decode the JPEG bytes, crop, flip."""
    from PIL import Image

    with Image.open(io.BytesIO(sample["jpg"])) as image:
        return crop_and_flip(image.convert("RGB")), int(sample["cls"])


def webdataset_augment(sample: tuple[Any, Any]) -> tuple[np.ndarray, int]:
    """webdataset's decoded ``(PIL image, label)`` -> ``(uint8 HWC image, label)``."""
    image, label = sample
    return crop_and_flip(image), int(label)


def shard_stream(system: str, workers: int, options: dict[str, Any]) -> tuple[Any, Any]:
    """``(batches, closer)`` of ``system`` over the JPEG shards, endless (as ``e2e._jpeg_stream``)."""
    shards = write_shards()
    if system == "prefetch-tar":
        import prefetch

        if workers >= 0:
            options = {"workers": workers, **options}
        loader = prefetch.Loader(
            prefetch.TarShards(shards), batch_size=jpegs.JPEG_BATCH, seed=0, transform=tar_augment, **options
        )
        gen = loader.stream()

        def close() -> None:
            gen.close()
            loader.close()

        return gen, close
    if system == "webdataset":
        import torch
        import webdataset as wds
        from torch.utils.data import DataLoader

        random.seed(0)
        torch.manual_seed(0)
        dataset = (
            wds.WebDataset(shards, shardshuffle=len(shards), seed=0, empty_check=False)
            .shuffle(SHUFFLE_BUFFER)
            .decode("pilrgb")
            .to_tuple("jpg", "cls")
            .map(webdataset_augment)
        )
        loader = DataLoader(dataset, batch_size=jpegs.JPEG_BATCH, num_workers=workers, persistent_workers=workers > 0)

        def endless() -> Any:
            while True:
                yield from loader

        stream = endless()
        return stream, stream.close
    raise ValueError(f"unknown system {system!r}")
