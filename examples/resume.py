"""Exact resume: save a Loader's position mid-epoch, stop, and continue in a fresh loader.

The resumed stream is the uninterrupted one, batch for batch, including the transform's randomness.

Run: python examples/resume.py
"""

from __future__ import annotations

import json

import numpy as np

import prefetch

N, BATCH, EPOCHS, INTERRUPT_AT = 1000, 32, 3, 45


def augment(sample):
    x, y = sample
    return x + np.random.randint(0, 10), y  # randomness seeded per batch: replayed exactly on resume


def make_loader() -> prefetch.Loader:
    x = np.arange(N * 4, dtype=np.int64).reshape(N, 4)
    y = np.arange(N)
    return prefetch.Loader(x, y, batch_size=BATCH, epochs=EPOCHS, seed=42, transform=augment, workers=2)


def main() -> None:
    with make_loader() as loader:
        reference = [y.tolist() for _, y in loader]  # the uninterrupted run

    # a run that is interrupted after INTERRUPT_AT batches; the state is small and JSON-friendly
    with make_loader() as loader:
        seen = []
        for _, y in loader:
            seen.append(y.tolist())
            if len(seen) == INTERRUPT_AT:
                saved = json.dumps(loader.state_dict())
                break
    print(f"interrupted after {INTERRUPT_AT} of {len(reference)} batches; saved state: {saved}")

    # a new process would do the same: same configuration, then load_state_dict
    with make_loader() as loader:
        loader.load_state_dict(json.loads(saved))
        rest = [y.tolist() for _, y in loader]
    print(f"resumed: {len(rest)} more batches")
    assert seen + rest == reference, "the resumed stream differs from the uninterrupted one"
    print("resumed stream == uninterrupted stream: OK")


if __name__ == "__main__":
    main()
