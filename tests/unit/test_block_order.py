"""``shuffle="block"``: blocks of consecutive samples shuffled, then samples shuffled within windows of blocks.

* every sample once per epoch, a last partial block and a last partial window included, sharded too;
* locality: each batch's samples come from the blocks of at most two windows (one, when batches line up
  with windows), so from at most ``2 * WINDOW_BLOCKS`` blocks; a window's samples are exactly its
  ``WINDOW_BLOCKS`` whole blocks;
* mixing: a batch holds samples of several blocks, and the order of the blocks differs by epoch.

(Determinism, resume and random access are checked for every ``shuffle`` in ``test_order.py``; the
engine's whole contract in ``tests/engine/test_order_contract.py``.)
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefetch.core.order import WINDOW_BLOCKS, Order

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def epoch_batches(order: Order, epoch: int) -> list[list[int]]:
    steps = order.steps_per_epoch
    return [order.batch_indices(b).tolist() for b in range(epoch * steps, (epoch + 1) * steps)]


def blocks_of(samples: list[int], block_size: int) -> set[int]:
    return {i // block_size for i in samples}


@FAST
@given(
    n=st.integers(1, 3000),
    block_size=st.integers(1, 300),
    seed=st.integers(0, 2**63 - 1),
    epoch=st.integers(0, 10**6),
    world_size=st.integers(1, 3),
)
def test_every_sample_once_per_epoch(n, block_size, seed, epoch, world_size):
    world_size = min(world_size, n)
    kept = []
    for rank in range(world_size):
        order = Order(
            n=n, batch_size=7, seed=seed, shuffle="block", block_size=block_size, rank=rank, world_size=world_size
        )
        kept += order.shard_indices(epoch, 0, order.shard_size).tolist()
    assert len(kept) == len(set(kept)) == n - n % world_size
    assert set(kept) <= set(range(n))


@FAST
@given(
    block_size=st.integers(1, 64),
    windows=st.integers(1, 5),
    per_window=st.sampled_from([1, 2, 4, 8]),
    seed=st.integers(0, 2**63 - 1),
    epoch=st.integers(0, 1000),
)
def test_batches_lined_up_with_windows_read_one_window(block_size, windows, per_window, seed, epoch):
    """``n`` a whole number of windows, and a batch size that divides a window: each batch reads at most
    ``WINDOW_BLOCKS`` blocks, and each window's batches read exactly its blocks, whole."""
    window = WINDOW_BLOCKS * block_size
    if window % per_window:
        return
    batch_size = window // per_window
    order = Order(
        n=windows * window,
        batch_size=batch_size,
        seed=seed,
        shuffle="block",
        block_size=block_size,
        last_batch="short",
        epochs=None,
    )
    batches = epoch_batches(order, epoch)
    seen: set[int] = set()
    for j in range(windows):
        samples = [i for batch in batches[j * per_window : (j + 1) * per_window] for i in batch]
        for batch in batches[j * per_window : (j + 1) * per_window]:
            assert len(blocks_of(batch, block_size)) <= WINDOW_BLOCKS
        own = blocks_of(samples, block_size)
        assert len(own) == WINDOW_BLOCKS and not own & seen  # its blocks, no other window's
        assert sorted(samples) == [
            i for block in sorted(own) for i in range(block * block_size, (block + 1) * block_size)
        ]
        seen |= own


@FAST
@given(
    n=st.integers(1, 5000),
    block_size=st.integers(1, 100),
    seed=st.integers(0, 2**63 - 1),
    epoch=st.integers(0, 1000),
    data=st.data(),
)
def test_any_batch_reads_at_most_two_windows(n, block_size, seed, epoch, data):
    """A window holds at least ``(WINDOW_BLOCKS - 1) * block_size + 1`` samples (all but the last window),
    so a run of that many positions meets two windows at most: ``2 * WINDOW_BLOCKS`` blocks."""
    batch_size = data.draw(st.integers(1, (WINDOW_BLOCKS - 1) * block_size + 1), label="batch_size")
    order = Order(n=n, batch_size=batch_size, seed=seed, shuffle="block", block_size=block_size, last_batch="short")
    for batch in epoch_batches(order, epoch):
        assert len(blocks_of(batch, block_size)) <= 2 * WINDOW_BLOCKS


def test_a_batch_mixes_blocks_and_the_block_order_changes_by_epoch():
    n, block_size, batch_size = 10_007, 100, 32  # a last block of 7 samples, a last window of 5 blocks
    order = Order(n=n, batch_size=batch_size, seed=3, shuffle="block", block_size=block_size, last_batch="short")
    firsts = []
    for epoch in range(4):
        batches = epoch_batches(order, epoch)
        mixed = [len(blocks_of(batch, block_size)) for batch in batches[:-1]]
        # 32 samples drawn from a window of 8 blocks: all from one or two blocks has probability < 1e-20.
        assert min(mixed) >= 3, mixed
        seen: list[int] = []  # the blocks in the order the epoch first reads them
        for batch in batches:
            seen += [b for b in dict.fromkeys(i // block_size for i in batch) if b not in seen]
        assert sorted(seen) == list(range(math.ceil(n / block_size)))
        firsts.append(tuple(seen))
    assert len(set(firsts)) == 4


def test_one_block_or_fewer_blocks_than_a_window_is_a_shuffle_of_all():
    """``block_size >= n``: one block, one window -- a plain shuffle of the whole data."""
    for block_size in (50, 64, 1000):
        order = Order(n=50, batch_size=50, seed=9, shuffle="block", block_size=block_size, last_batch="short")
        epoch = order.batch_indices(0).tolist()
        assert sorted(epoch) == list(range(50)) and epoch != list(range(50))
