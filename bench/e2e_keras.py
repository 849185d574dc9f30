"""The Keras ``fit`` workload of the end-to-end runs: the seed's use case.

Keras ``fit`` (torch backend) on 8x8 digits upsampled to 32x32 with a ~1 ms/sample numpy augmentation
(pad/crop, flip, noise, blur), a small CNN, batch 32, all defaults; fed by the seed's plain generator or by
``prefetch.data_generator``. Figure: wall time per epoch, and every batch's time (``batch_s``) for the steady
state (``e2e_figures.steady_state_batch``). ``e2e.py run`` calls ``run_keras`` in a fresh process.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import numpy as np
from e2e_figures import steady_state_batch

KERAS_SAMPLES = 1536
KERAS_BATCH = 32
KERAS_EPOCHS = 1 if os.environ.get("BENCH_QUICK", "") not in ("", "0") else 3  # 1: a smoke run
KERAS_SIDE = 32


def digits(count: int = KERAS_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """8x8 digit-like images (a blurred random stroke pattern per class), upsampled to 32x32 float32."""
    rng = np.random.default_rng(7)
    prototypes = rng.uniform(0, 1, (10, 8, 8)) > 0.55
    labels = rng.integers(0, 10, count)
    small = prototypes[labels].astype(np.float32) + rng.normal(0, 0.2, (count, 8, 8)).astype(np.float32)
    big = np.kron(small, np.ones((4, 4), np.float32))
    return big[..., None], labels.astype(np.int64)


def digits_augment(sample: tuple[np.ndarray, Any]) -> tuple[np.ndarray, Any]:
    """~1 ms of numpy per sample: pad and random crop, random flip, noise, a 5-tap blur in both directions."""
    image, label = sample
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    top, left = np.random.randint(0, 9), np.random.randint(0, 9)
    out = padded[top : top + KERAS_SIDE, left : left + KERAS_SIDE]
    if np.random.rand() < 0.5:
        out = out[:, ::-1]
    out = out + np.random.normal(0, 0.05, out.shape).astype(np.float32)
    kernel = np.array([1, 4, 6, 4, 1], np.float32) / 16
    for _ in range(12):
        out = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), 0, out)
    return np.ascontiguousarray(out, dtype=np.float32), label


def _model() -> Any:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((KERAS_SIDE, KERAS_SIDE, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def run_keras(system: str, threads: str = "default", **options: Any) -> dict[str, Any]:
    """``model.fit`` for KERAS_EPOCHS epochs on the digits, fed by the seed's generator or ``data_generator``."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    import torch

    from prefetch.demo import plain_data_generator

    if threads != "default":
        torch.set_num_threads(int(threads))
    x, y = digits()
    model = _model()
    epoch_ends: list[float] = []
    batch_ends: list[float] = []
    threads_at_epoch_end: list[int] = []  # the training thread's intra-op threads, as prefetch may tune them
    decided = {"at": 0, "last": ()}  # the batch after which prefetch's decisions last changed

    steps = KERAS_SAMPLES // KERAS_BATCH
    started = time.perf_counter()
    if system == "plain":
        random.seed(0)
        np.random.seed(0)
        gen = plain_data_generator(KERAS_BATCH, x, y, shuffle=True, transform=digits_augment)
        engine_decisions = None
    else:
        import prefetch

        gen = prefetch.data_generator(KERAS_BATCH, x, y, shuffle=True, seed=0, transform=digits_augment, **options)

        def engine_decisions() -> tuple[str, ...]:
            engine = prefetch.Loader.of(gen).engine
            return tuple(getattr(engine, "decisions", tuple)())

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            batch_ends.append(time.perf_counter())
            if engine_decisions is not None and (made := engine_decisions()) != decided["last"]:
                decided.update(at=len(batch_ends), last=made)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            epoch_ends.append(time.perf_counter())
            threads_at_epoch_end.append(torch.get_num_threads())

    info: dict[str, Any] = {}
    try:
        model.fit(gen, steps_per_epoch=steps, epochs=KERAS_EPOCHS, verbose=0, callbacks=[Clock()])
        if system != "plain":
            stats = prefetch.Loader.of(gen).stats()
            info["decisions"] = list(stats.decisions)
            info["auto_changes"] = [list(change) for change in getattr(stats, "auto_changes", ())]
            info["decided_at_batch"] = decided["at"]
    finally:
        gen.close()
    total = time.perf_counter() - started
    epochs = [b - a for a, b in zip([started, *epoch_ends], epoch_ends)]
    batch_s = [b - a for a, b in zip([started, *batch_ends], batch_ends)]
    return {
        "s_per_epoch": total / KERAS_EPOCHS,
        "epoch_s": [round(e, 3) for e in epochs],
        "total_s": total,
        "threads": threads_at_epoch_end,
        "batch_s": [round(t, 4) for t in batch_s],
        "steady_batches": steady_state_batch(batch_s, tail=steps),  # the final median: the last epoch's
        **info,
    }
