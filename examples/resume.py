"""Exact resume: save a Loader's position mid-epoch, stop, and continue in a fresh loader.

The resumed stream is the uninterrupted one, batch for batch, including the transform's randomness.
The training loop is the DataLoader loop (one `for` over the loader per epoch); after load_state_dict
the first `for` yields the rest of the interrupted epoch, then each `for` a whole epoch.

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


def train(loader: prefetch.Loader, seen: list, stop_after: int | None = None) -> str | None:
    """The epoch loop, from wherever the loader is; returns a saved state if it stops after ``stop_after`` batches."""
    for _epoch in range(loader.position // len(loader), EPOCHS):
        for _, y in loader:
            seen.append(y.tolist())  # a training step
            if len(seen) == stop_after:
                return json.dumps(loader.state_dict())  # small and JSON-friendly
    return None


def main() -> None:
    with make_loader() as loader:
        reference = [y.tolist() for _, y in loader.stream()]  # the uninterrupted run: every epoch

    # a run that is interrupted after INTERRUPT_AT batches, in its second epoch
    with make_loader() as loader:
        seen: list = []
        saved = train(loader, seen, stop_after=INTERRUPT_AT)
    assert saved is not None
    print(f"interrupted after {INTERRUPT_AT} of {len(reference)} batches; saved state: {saved}")

    # a new process would do the same: same configuration, then load_state_dict
    with make_loader() as loader:
        loader.load_state_dict(json.loads(saved))
        rest: list = []
        train(loader, rest)
    print(f"resumed: {len(rest)} more batches")
    assert seen + rest == reference, "the resumed stream differs from the uninterrupted one"
    print("resumed stream == uninterrupted stream: OK")


if __name__ == "__main__":
    main()
