"""Would more workers help? prefetch.profile measures your pipeline at several worker counts.

Each count is measured three times, interleaved; the recommendation is the fewest workers within
the noise of the fastest, with its margin (on a machine too busy to tell, it keeps the default and says so).

Run: python examples/profile_pipeline.py
"""

from __future__ import annotations

import numpy as np

import prefetch

N, BATCH = 2000, 32


def heavy_augment(sample):
    """A CPU-bound transform standing in for image augmentation."""
    x, y = sample
    for _ in range(3):
        x = np.sqrt(np.abs(np.fft.irfft(np.fft.rfft(x)))) + np.random.rand()
    return x.astype(np.float32), y


_rng = np.random.default_rng(0)
X = _rng.normal(size=(N, 4096)).astype(np.float32)  # made once: the sweep builds a loader per run
Y = _rng.integers(0, 10, N)


def make_loader(workers: int) -> prefetch.Loader:
    return prefetch.Loader(X, Y, batch_size=BATCH, seed=0, transform=heavy_augment, workers=workers)


def train_step(batch) -> None:
    """Stands in for the model: the stall figure is then the one your loop would see."""
    x, _ = batch
    float((x @ x.T[:, :8]).sum())


def main() -> None:
    report = prefetch.profile(
        make_loader, workers=[0, 1, 2, 4], batches=20, warmup=3, rounds=3, step=train_step, progress=False
    )
    print(report)


if __name__ == "__main__":
    main()
