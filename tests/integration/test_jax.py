"""A JAX training loop over a Loader, batches moved with jax.device_put."""

from __future__ import annotations

import numpy as np
import pytest

import prefetch

pytestmark = pytest.mark.integration

N, FEATURES, BATCH, EPOCHS = 512, 8, 64, 4


def test_training_loop_with_device_put_lowers_the_loss():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype(np.float32)
    y = (x @ rng.normal(size=(FEATURES, 1))).astype(np.float32)

    def loss_fn(w, xb, yb):
        return jnp.mean((xb @ w - yb) ** 2)

    @jax.jit
    def step(w, xb, yb):
        loss, grad = jax.value_and_grad(loss_fn)(w, xb, yb)
        return w - 0.05 * grad, loss

    w = jnp.zeros((FEATURES, 1), dtype=jnp.float32)
    losses = []
    with prefetch.Loader(x, y, batch_size=BATCH, epochs=EPOCHS, seed=0, workers=2) as loader:
        for xb, yb in loader.stream():  # every epoch in one loop
            w, loss = step(w, jax.device_put(xb), jax.device_put(yb))
            losses.append(float(loss))
    per_epoch = N // BATCH
    assert len(losses) == EPOCHS * per_epoch
    assert np.mean(losses[-per_epoch:]) < 0.1 * np.mean(losses[:per_epoch])
