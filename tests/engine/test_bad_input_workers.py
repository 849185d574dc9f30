"""Unusual but valid input through worker processes: zero-byte samples give the stream they give in process."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import fingerprint

import prefetch

N = 20


def stream(*sources, **options) -> list:
    with prefetch.Loader(*sources, batch_size=4, epochs=2, seed=5, **options) as loader:
        return [fingerprint(batch) for batch in loader.stream()]


def keep(sample):
    return sample


@pytest.mark.parametrize("collate", ["auto", "list"])
@pytest.mark.parametrize("transform", [None, keep], ids=["plain", "transform"])
def test_zero_byte_samples_give_the_same_stream_with_workers(collate, transform, start_method):
    empty = np.zeros((N, 3, 0), dtype=np.float32)
    labels = np.arange(N)
    expected = stream(empty, labels, collate=collate, transform=transform, workers=0)
    got = stream(empty, labels, collate=collate, transform=transform, workers=2, start_method=start_method)
    assert got == expected
    assert len(got) == 2 * N // 4
