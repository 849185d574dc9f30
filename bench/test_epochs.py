"""Short epochs against one long epoch: does the loader keep its pipeline full across epoch ends?"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from workloads import (
    LONG_EPOCH_BATCHES,
    LONG_EPOCH_LABEL,
    SHORT_EPOCH_BATCHES,
    SHORT_EPOCH_LABEL,
    WORKLOADS,
    epoch_data,
    open_stream,
)

WORKERS = 2


@pytest.mark.parametrize(
    ("epoch_batches", "label"),
    [(SHORT_EPOCH_BATCHES, SHORT_EPOCH_LABEL), (LONG_EPOCH_BATCHES, LONG_EPOCH_LABEL)],
    ids=["short", "long"],
)
@pytest.mark.parametrize("system", ["prefetch", "torch"])
def test_epochs(measure: Callable[..., Any], system: str, epoch_batches: int, label: str) -> None:
    """samples/s over 16-batch epochs (512 tiny samples, endless) and over one epoch longer than the run,
    both with ~0.1 ms of CPU work per sample and 2 workers; the report gives short / long.

    Why: small data sets or frequent evaluation make epochs short. prefetch's order straddles epoch ends, so
    the ratio should be ~1; a loader that waits for an epoch to drain before it starts the next (torch
    DataLoader, iterated epoch after epoch with ``shuffle=True``) loses a pipeline's worth of time per epoch.
    """
    if system == "torch":
        pytest.importorskip("torch")
    workload = WORKLOADS["epochs"]
    with open_stream(system, workload, WORKERS, data=epoch_data(epoch_batches), long_epochs=False) as stream:
        measure(stream, workload, system, WORKERS, variant=label)
