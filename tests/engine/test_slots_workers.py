"""Every dtype reaches the consumer unchanged through worker processes and slots (slots without processes:
tests/unit/test_slots.py)."""

from __future__ import annotations

import numpy as np
import pytest

import prefetch


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", ["float16", ">f4", "bool", "datetime64[s]", "complex128"])
def test_every_dtype_reaches_the_consumer_unchanged_through_workers(dtype):
    x = (np.arange(40 * 3) % 7).reshape(40, 3).astype(dtype)
    y = np.arange(40)

    def run(workers: int) -> list:
        loader = prefetch.Loader(
            x, y, batch_size=8, transform=lambda s: {"x": s[0], "y": s[1]}, workers=workers, epochs=1, seed=3
        )
        with loader:
            batches = list(loader)
        for batch in batches:
            assert batch["x"].dtype == x.dtype
        return [{k: v.tolist() for k, v in b.items()} for b in batches]

    assert run(2) == run(0)
