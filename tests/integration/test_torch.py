"""A PyTorch training loop over a Loader: batches become tensors without a copy."""

from __future__ import annotations

import numpy as np
import pytest

import prefetch

pytestmark = pytest.mark.integration

N, FEATURES, BATCH, EPOCHS = 1024, 8, 64, 4


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return torch


def test_training_loop_over_a_loader_lowers_the_loss_without_copies(torch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype(np.float32)
    y = (x @ rng.normal(size=(FEATURES, 1)) + 0.01 * rng.normal(size=(N, 1))).astype(np.float32)
    model = torch.nn.Linear(FEATURES, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    epoch_losses: list[list[float]] = [[] for _ in range(EPOCHS)]
    with prefetch.Loader(x, y, batch_size=BATCH, epochs=EPOCHS, seed=0, workers=2, last_batch="short") as loader:
        for epoch in range(EPOCHS):  # the DataLoader loop: one `for` over the loader per epoch
            for xb, yb in loader:
                tx, ty = torch.from_numpy(xb), torch.from_numpy(yb)
                assert tx.data_ptr() == xb.ctypes.data and ty.data_ptr() == yb.ctypes.data  # a view, not a copy
                loss = torch.nn.functional.mse_loss(model(tx), ty)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                epoch_losses[epoch].append(loss.item())
    assert all(len(losses) == N // BATCH == len(loader) for losses in epoch_losses)
    assert np.mean(epoch_losses[-1]) < 0.1 * np.mean(epoch_losses[0])
