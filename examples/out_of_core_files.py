"""Out-of-core training from files: only the paths are in memory, workers load each file by index.

Writes a few thousand small .npy files to a temporary directory, then trains a logistic regression
(plain numpy) from them through prefetch.Files.

Run: python examples/out_of_core_files.py
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

import prefetch

N_FILES, FEATURES, BATCH, EPOCHS = 3000, 32, 100, 5


def write_dataset(directory: str) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    w = rng.normal(size=FEATURES)
    paths, labels = [], []
    for i in range(N_FILES):
        sample = rng.normal(size=FEATURES).astype(np.float32)
        path = os.path.join(directory, f"sample_{i:05d}.npy")
        np.save(path, sample)
        paths.append(path)
        labels.append(float(sample @ w > 0))
    return paths, np.array(labels, dtype=np.float32)


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        paths, labels = write_dataset(directory)
        print(f"wrote {len(paths)} files to {directory}")
        files = prefetch.Files(paths)  # default load for .npy: np.load, in the workers
        w, b = np.zeros(FEATURES, np.float32), 0.0
        with prefetch.Loader(files, labels, batch_size=BATCH, epochs=EPOCHS, seed=0, workers=2) as loader:
            for epoch in range(1, EPOCHS + 1):  # each `for` over the loader is one epoch: len(loader) batches
                losses = []
                for x, y in loader:  # x: (BATCH, FEATURES) stacked from BATCH files
                    p = 1 / (1 + np.exp(-(x @ w + b)))
                    losses.append(float(-np.mean(y * np.log(p + 1e-7) + (1 - y) * np.log(1 - p + 1e-7))))
                    w -= 0.5 * x.T @ (p - y) / len(y)
                    b -= 0.5 * float(np.mean(p - y))
                print(f"epoch {epoch}: mean loss {np.mean(losses):.4f}")
            stats = loader.stats()
        print(f"{stats.samples} samples read from disk at {stats.samples_per_s:.0f} samples/s")


if __name__ == "__main__":
    main()
