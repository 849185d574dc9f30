"""``StallMonitor`` in a real Keras ``fit``, on figures the test sets: the epoch logs carry each epoch's figures,
and the warning that the step and the workers compete comes once per ``fit``, naming the first epoch that did.

The loader's ``stats()`` is scripted (one second per epoch, one core), so the verdict does not depend on what
else the machine runs; test_keras.py checks the same monitor on a real contended run by the CPU it counts."""

from __future__ import annotations

import itertools
import os
import warnings

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported (lazily, by the fixture)

import numpy as np
import pytest

import prefetch
from prefetch._tuning import CONTENTION_SHARE, WAITING_SHARE
from prefetch.stats import Stats

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:`shuffle=True` was passed:UserWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

N, FEATURES, BATCH, STEPS = 64, 4, 8, 4
WORKER = 4242  # a worker pid in the scripted figures

# per epoch: (the loop's cores, the workers' cores, the share of the epoch spent waiting for data)
WAITING = (0.05, 0.5, WAITING_SHARE + 0.1)  # the loop waits for data: no contention
COMPETING = (0.6, CONTENTION_SHARE - 0.6 + 0.05, WAITING_SHARE - 0.3)
ROOMY = (0.3, 0.3, 0.2)  # the core is not filled


@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras")


def scripted(epochs: list[tuple[float, float, float]]):
    """A ``loader.stats`` whose snapshots, taken at each epoch's begin and end, give ``epochs``' figures."""
    calls = itertools.count()

    def stats() -> Stats:
        done = (next(calls) + 1) // 2  # begin of epoch e: e epochs done; its end: e + 1
        total = [sum(epoch[i] for epoch in epochs[:done]) for i in range(3)]  # core-seconds, 1 s per epoch
        elapsed = float(done)
        rate = (lambda seconds: seconds / elapsed) if done else (lambda seconds: 0.0)
        return Stats(
            batches=done * STEPS, samples=done * STEPS * BATCH, elapsed_s=elapsed,
            batches_per_s=rate(done * STEPS), samples_per_s=rate(done * STEPS * BATCH),
            wait_fraction=rate(total[2]), worker_busy={WORKER: rate(total[1])},
            load_s=0.0, transform_s=0.0, collate_s=0.0, transfer_s=0.0, mean_fill=0.0, max_fill=0, restarts=0,
            cores=1, consumer_cpu=rate(total[0]), workers_cpu=rate(total[1]), consumer_threads=1, started_at=1.0,
        )  # fmt: skip

    return stats


def fit(keras, monkeypatch, epochs, fits: int = 1):
    """``fits`` fits of ``len(epochs)`` epochs each, on one loader with one ``StallMonitor``, every one on the
    scripted ``epochs``: the last fit's history, and the competing warnings of each fit."""
    from prefetch.keras import StallMonitor

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, FEATURES)).astype(np.float32), rng.normal(size=(N, 1)).astype(np.float32)
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    warned = []
    with prefetch.Loader(x, y, batch_size=BATCH, seed=0, workers=0) as loader:
        monkeypatch.setattr(loader, "stats", scripted(epochs * fits))
        monitor, stream = StallMonitor(loader), loader.stream()
        for _ in range(fits):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", prefetch.PrefetchWarning)
                history = model.fit(
                    stream, steps_per_epoch=STEPS, epochs=len(epochs), shuffle=False, verbose=0, callbacks=[monitor]
                )
            said = [str(w.message) for w in caught if issubclass(w.category, prefetch.PrefetchWarning)]
            warned.append([message for message in said if "workers compete for" in message])
        stream.close()
    return history.history, warned


def test_the_logs_carry_each_epochs_figures(keras, monkeypatch):
    epochs = [WAITING, COMPETING, ROOMY]
    logs, _ = fit(keras, monkeypatch, epochs)
    assert logs["data_stall"] == pytest.approx([wait for _, _, wait in epochs])
    assert logs["data_cpu_busy"] == pytest.approx([min(1.0, loop + workers) for loop, workers, _ in epochs])
    assert logs["data_samples_per_s"] == pytest.approx([STEPS * BATCH] * 3)


@pytest.mark.parametrize(
    ("epochs", "warned_at"),
    [
        ([WAITING, COMPETING, COMPETING], 2),  # once per fit, at the first epoch that competed
        ([COMPETING, ROOMY, COMPETING], 1),
        ([ROOMY, WAITING, ROOMY], None),
    ],
    ids=["second", "first", "never"],
)
def test_the_warning_comes_once_per_fit_naming_the_first_epoch_that_competed(keras, monkeypatch, epochs, warned_at):
    _, warned = fit(keras, monkeypatch, epochs, fits=2)  # the same monitor in both fits
    for compete in warned:
        if warned_at is None:
            assert compete == []
        else:
            assert len(compete) == 1, compete
            assert compete[0].startswith(f"epoch {warned_at}: the training step and the workers compete for 1 core")
