"""A PyTorch training loop over a prefetch.Loader: batches become tensors without a copy.

Run: python examples/torch_loop.py   (needs torch)
"""

from __future__ import annotations

import numpy as np
import torch

import prefetch

N, FEATURES, CLASSES, BATCH, EPOCHS = 4096, 20, 4, 128, 4


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype(np.float32)
    y = (x @ rng.normal(size=(FEATURES, CLASSES))).argmax(axis=1)  # int64 labels

    torch.manual_seed(0)
    torch.set_num_threads(1)  # a tiny model: more threads only contend with the workers for the cores
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

    # The DataLoader loop: each `for` over the loader is one epoch of len(loader) batches (its own shuffle);
    # the last batch of each epoch is short, like DataLoader's default. The workers keep running between
    # epochs, so the next epoch starts with batches ready.
    with prefetch.Loader(x, y, batch_size=BATCH, epochs=EPOCHS, seed=0, last_batch="short", workers=2) as loader:
        for epoch in range(EPOCHS):
            total = 0.0
            for xb, yb in loader:
                inputs, targets = torch.from_numpy(xb), torch.from_numpy(yb)  # views of shared memory, no copy
                loss = torch.nn.functional.cross_entropy(model(inputs), targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
            print(f"epoch {epoch}: mean loss {total / len(loader):.4f}")
        print(loader.stats())
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x)).argmax(dim=1).numpy() == y).mean()
    print(f"training accuracy {accuracy:.1%}")


if __name__ == "__main__":
    main()
