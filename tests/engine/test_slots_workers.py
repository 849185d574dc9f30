"""Every dtype reaches the consumer unchanged through worker processes and slots (slots without processes:
tests/unit/test_slots.py)."""

from __future__ import annotations

import numpy as np
import pytest

import prefetch
from prefetch.ipc import channel
from prefetch.ipc.channel import Spilled
from prefetch.processes.messages import BatchReady


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


TEXTS = [f"{i:04d}" + "x" * 196 for i in range(400)]  # 200 characters each


@pytest.mark.parametrize("batch_size", [8, 40, 80], ids=["2 KiB", "8 KiB", "16 KiB"])
def test_small_pickled_batches_travel_without_a_file_per_batch(monkeypatch, start_method, batch_size):
    """A batch of a few KiB of pickle (a list of strings) is too large for one atomic pipe write: it goes
    in the slot, whose segment is made once and reused, never in a spill file of its own."""
    arrived: dict[str, int] = {"spilled": 0}
    segments: set[str] = set()
    unspill = channel._unspill

    def counting(message):
        if isinstance(message, Spilled):
            arrived["spilled"] += 1
        elif isinstance(message, BatchReady) and message.layout.segment is not None:
            segments.add(message.layout.segment.name)
        return unspill(message)

    monkeypatch.setattr(channel, "_unspill", counting)  # the consumer's reader: every message passes here
    options = {"batch_size": batch_size, "collate": "list", "epochs": 2, "seed": 4}
    with prefetch.Loader(TEXTS, workers=0, **options) as loader:
        expected = list(loader.stream())
    with prefetch.Loader(TEXTS, workers=2, start_method=start_method, **options) as loader:
        got = list(loader.stream())
        slots = loader.config.max_slots
    assert got == expected and len(got) == 2 * len(TEXTS) // batch_size
    assert arrived["spilled"] == 0
    assert len(segments) <= slots  # one per slot at most (none when the batch rides in its message)
