"""Backpressure and held batches (contract 3.4, 3.5, 3.9): at most ``prefetch`` batches are made ahead of the
consumer, counted at every load; a batch the user holds never changes, however many are held."""

from __future__ import annotations

import pytest
import registry
from helpers import AheadSource, consume_within_the_bound
from workloads import DATA_X, LABELS, OPTIONS, digest, reference

DEPTH = 3
AHEAD_SAMPLES = 64  # 16 batches of 4, read in order


@pytest.mark.contract(registry.BOUND)
def test_no_more_than_prefetch_batches_are_made_ahead_of_the_consumer(executor, tmp_path):
    source = AheadSource(AHEAD_SAMPLES, 4, str(tmp_path))
    options = {"batch_size": 4, "shuffle": False, "epochs": 1, "prefetch": DEPTH}
    with executor.loader(source, **options) as loader:
        consume_within_the_bound(loader, source, DEPTH, batches=10)
        assert loader.stats().max_fill <= DEPTH


@pytest.mark.contract(registry.HELD_BATCHES)
def test_held_batches_never_change_and_holding_them_never_blocks(executor):
    """Every batch of two epochs held at once, far more than ``prefetch``: each is still what it was
    when it came (and what the reference is), and its arrays are the user's to write to."""
    held, at_arrival = [], []
    with executor.loader(DATA_X, LABELS, **{**OPTIONS, "prefetch": 2}) as loader:
        for batch in loader.stream():
            held.append(batch)
            at_arrival.append(digest(batch))
        assert [digest(batch) for batch in held] == at_arrival == list(reference()[0])
        assert all(part.flags.writeable for batch in held for part in batch)
