"""Keras `fit` fed by prefetch: the seed's generator call, now parallel, with the data stall and the CPU in the logs.

`shuffle=False` in `fit`: prefetch shuffles; Keras' own `shuffle` applies to arrays and warns for a generator.

Run: KERAS_BACKEND=torch python examples/keras_fit.py   (needs keras and torch)
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported

import keras
import numpy as np
import torch

import prefetch
from prefetch.keras import StallMonitor

N, FEATURES, BATCH, EPOCHS = 2048, 16, 64, 5


def augment(sample):
    """Runs in a worker for every sample: a little noise, seeded per batch (same for any `workers`)."""
    x, y = sample
    return x + np.random.normal(0, 0.01, x.shape).astype(np.float32), y


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype(np.float32)
    y = (x @ rng.normal(size=(FEATURES, 1))).astype(np.float32)

    keras.utils.set_random_seed(0)
    torch.set_num_threads(1)  # a tiny model: more threads only contend with the workers for the cores
    layers = [keras.Input((FEATURES,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)]
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")

    gen = prefetch.data_generator(BATCH, x, y, shuffle=True, seed=0, transform=augment, workers=2)
    try:
        history = model.fit(
            gen, steps_per_epoch=N // BATCH, epochs=EPOCHS, shuffle=False, verbose=2, callbacks=[StallMonitor(gen)]
        )
    finally:
        gen.close()  # stops the worker processes (dropping the generator does too)
    losses = history.history["loss"]
    print(f"loss: first epoch {losses[0]:.4f} -> last epoch {losses[-1]:.4f}")
    stalls = ", ".join(f"{s:.0%}" for s in history.history["data_stall"])
    print(f"data stall per epoch: {stalls}")
    busy = ", ".join(f"{share:.0%}" for share in history.history["data_cpu_busy"])
    print(f"cores busy (training process + workers) per epoch: {busy}")


if __name__ == "__main__":
    main()
