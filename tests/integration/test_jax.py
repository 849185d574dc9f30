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


class JaxSamples:
    """A dataset whose samples are ``jax.Array``s (made where they are asked for: in the worker)."""

    def __init__(self, data: np.ndarray):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        import jax.numpy as jnp

        return jnp.asarray(self.data[i]), jnp.asarray(i)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_array_samples_are_stacked_into_numpy_arrays(dtype):
    jax = pytest.importorskip("jax")
    data = np.random.default_rng(0).normal(size=(64, 3, 4)).astype(jax.numpy.dtype(dtype))
    got = {}
    for workers in (0, 2):
        with prefetch.Loader(JaxSamples(data), batch_size=8, epochs=1, shuffle=False, workers=workers) as loader:
            got[workers] = [(x.copy(), y.copy()) for x, y in loader]
    for workers, batches in got.items():
        assert len(batches) == 8, workers
        for number, (x, y) in enumerate(batches):
            assert isinstance(x, np.ndarray) and x.dtype == data.dtype and x.flags.writeable
            np.testing.assert_array_equal(x, data[number * 8 : (number + 1) * 8])
            np.testing.assert_array_equal(y, np.arange(number * 8, (number + 1) * 8))
