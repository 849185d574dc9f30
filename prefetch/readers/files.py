"""``Files``: a map-style source over file paths, each file loaded in a worker.

The dataset does not have to fit in memory: the source holds only the paths, and
``source[i]`` reads file ``i`` when a worker needs it, so loading runs in parallel
in the workers, ahead of the training loop::

    paths = sorted(glob.glob("data/*.npy"))
    with prefetch.Loader(prefetch.Files(paths), labels, batch_size=64, epochs=1) as loader:
        for x, y in loader:
            train_step(x, y)

``Files`` pickles small (paths and the ``load`` function, with dill: lambdas and
closures work), so it travels cheaply to spawned processes.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


def load_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of a ``.npz`` file, in a dict (read at once; the file is closed)."""
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}


def load_bytes(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def load_default(path: str) -> Any:
    """By extension: ``.npy`` -> the array, ``.npz`` -> a dict of arrays, anything else -> the file's bytes."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        return np.load(path)
    if suffix == ".npz":
        return load_npz(path)
    return load_bytes(path)


class Files:
    """A map-style source over file paths: ``len(files)`` paths, ``files[i]`` is ``load(paths[i])``.

    ``load(path)`` runs in a worker for every sample. The default loads by extension:
    ``.npy`` -> ``np.load(path)``, ``.npz`` -> a dict of its arrays, anything else ->
    the file's bytes (decode them in ``load`` or in ``transform``).

    Example::

        files = prefetch.Files(sorted(glob.glob("images/*.png")), load=lambda p: np.asarray(PIL.Image.open(p)))
        loader = prefetch.Loader(files, labels, batch_size=32, transform=augment)
    """

    def __init__(self, paths: Iterable[str | os.PathLike[str]], load: Callable[[str], Any] | None = None):
        if isinstance(paths, (str, bytes, os.PathLike)):
            raise TypeError(
                f"Files takes a sequence of file paths, not one path ({os.fsdecode(paths)!r}); "
                "for a directory pass e.g. sorted(glob.glob('dir/*.npy'))"
            )
        if load is not None and not callable(load):
            raise TypeError(f"load must be a function load(path) -> sample; got {type(load).__name__}")
        self.paths: list[str] = [os.fsdecode(os.fspath(path)) for path in paths]
        self.load: Callable[[str], Any] = load if load is not None else load_default

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return Files(self.paths[index], self.load)
        return self.load(self.paths[operator.index(index)])

    def __repr__(self) -> str:
        shown = f"{self.paths[0]!r}, ..." if self.paths else ""
        return f"Files([{shown}] {len(self.paths)} paths, load={getattr(self.load, '__name__', self.load)!r})"
