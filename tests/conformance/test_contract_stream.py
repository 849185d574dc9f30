"""Determinism (contract 3.1, 3.9): on every executor the stream over two epochs -- order, contents, and every
draw a transform makes from ``random``, ``np.random``, torch and ``prefetch.batch_rng()`` -- is the
``workers=0`` stream, and the caller's own generators are left as they were."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import registry
from torchdraws import torch
from workloads import BATCH_SIZE, DATA_X, EPOCHS, LABELS, OPTIONS, SEED, WITH_TORCH, N, digest, reference

import prefetch

BATCHES = EPOCHS * -(-N // BATCH_SIZE)  # last_batch='wrap': every batch full, the last one from a third epoch


def test_the_workload_draws_from_every_generator_and_crosses_an_epoch():
    """What the rows below compare is worth comparing: every generator is drawn from, differently for
    every sample, another seed gives another stream, and one batch holds samples of both epochs."""
    with prefetch.Loader(DATA_X, LABELS, workers=0, **WITH_TORCH) as loader:
        batches = list(loader.stream())
    draws = np.concatenate([batch[2] for batch in batches])
    columns = draws.shape[1] if torch is not None else draws.shape[1] - 1
    assert all(len(set(draws[:, column])) == len(draws) for column in range(columns))
    assert len(batches) == BATCHES == len(reference("torch")[0])
    labels = np.concatenate([batch[1] for batch in batches])
    assert N % BATCH_SIZE != 0  # so batch N // BATCH_SIZE ends epoch 1 and begins epoch 2
    assert sorted(labels[:N]) == sorted(labels[N : 2 * N]) == list(range(N))  # each epoch: every sample once
    assert labels[:N].tolist() != labels[N : 2 * N].tolist()  # each epoch its own order
    with prefetch.Loader(DATA_X, LABELS, workers=0, **{**WITH_TORCH, "seed": SEED + 1}) as loader:
        assert [digest(batch) for batch in loader.stream()] != list(reference("torch")[0])


@pytest.mark.contract(registry.STREAM)
def test_the_stream_over_two_epochs_is_the_workers_0_stream(executor):
    expected = reference("torch")[0]
    with executor.loader(DATA_X, LABELS, **WITH_TORCH) as loader:
        got = [digest(batch) for batch in loader.stream()]  # iter(loader) would be one epoch
    assert len(got) == BATCHES
    assert got == list(expected)  # each batch's SHA-256, so a failure names the first batch that differs


@pytest.mark.contract(registry.STREAM)
def test_the_stream_with_io_threads_is_the_workers_0_stream(executor):
    """``io_threads`` loads a batch's samples in threads; the transform's draws stay in the batch's order."""
    expected = reference("torch")[0]
    with executor.loader(DATA_X, LABELS, io_threads=4, **WITH_TORCH) as loader:
        got = [digest(batch) for batch in loader.stream()]
    assert got == list(expected)


def _generator_states() -> bytes:
    states = [random.getstate(), np.random.get_state()]
    if torch is not None:
        states.append(torch.get_rng_state().numpy().tobytes())
    return pickle.dumps(states)


@pytest.mark.contract(registry.CALLER_RNG)
def test_the_callers_generators_are_left_as_they_were(executor):
    before = _generator_states()  # torch's too: imported here, so every batch made here seeds it
    with executor.loader(DATA_X, LABELS, **OPTIONS) as loader:
        for _ in loader.stream():
            pass
    assert _generator_states() == before


@pytest.mark.contract(registry.STREAM)
def test_the_stream_with_workers_auto_is_the_workers_0_stream(executor):
    """``workers="auto"``: the processes executor decides how many workers get tasks, Ray takes the budget; the
    stream is the same either way."""
    options = {**WITH_TORCH, **executor.options, "workers": "auto"}
    with prefetch.Loader(DATA_X, LABELS, **options) as loader:
        got = [digest(batch) for batch in loader.stream()]
        stats = loader.stats()
    assert got == list(reference("torch")[0])
    resizes = stats.auto_workers > 0  # the processes executor's run resizes; Ray's does not
    assert resizes or any("workers='auto' is the budget" in decision for decision in stats.decisions)
    assert resizes == (executor.options["executor"] == "processes")
