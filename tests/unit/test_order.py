"""Property-based tests of ``prefetch.core.order``: which sample indices make up batch ``b``.

They check the rules of the module docstring:

* every epoch's order is a permutation of ``range(n)``, a pure function of ``(seed, epoch)``,
  different across epochs and seeds, the identity when ``shuffle`` is off, and exactly the
  order docs/design.md describes (``reference_order``, written from it on its own), for
  ``shuffle`` True, False and ``"block"``;
* sharding: the ranks' shards of one epoch are disjoint, equally sized, dealt round-robin
  from the front of the permutation, and every rank plans the same number of batches;
* ``last_batch`` = ``"wrap"`` / ``"short"`` / ``"drop"``: batch counts (``steps_per_epoch`` per epoch
  in every mode), batch sizes (``wrap``: all full) and the concatenation of the batches (also with
  ``batch_size`` larger than the shard); ``epoch_end``;
* resuming at any batch, or asking for batches in any order, gives the same batches as one
  uninterrupted walk (the per-``Order`` caches never change a result);
* ``IndexError`` outside a finite stream, endless streams far out, batches that straddle an
  epoch boundary;
* small hand-checked plans.

The bijection itself (every n, the cycle-walk bound, mixing, O(1) memory) is tested in
``test_permutation.py``; the block order's locality in ``test_block_order.py``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import reference_order
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from prefetch.core.order import CHUNK_SAMPLES, LAST_BATCH_MODES, SHUFFLE_MODES, Order

SEEDS = st.integers(min_value=0, max_value=2**63 - 1)
MODES = st.sampled_from(LAST_BATCH_MODES)
FEW_EPOCHS = st.integers(1, 4)
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw, *, max_n=40, max_world=4, epochs=FEW_EPOCHS, big_batches=True):
    """Keyword arguments of an ``Order``: any ``world_size <= n``, any rank, any mode, any ``shuffle``
    (small blocks, so that a few samples make several blocks and windows).

    An endless ``"drop"`` stream whose batch is larger than the shard (no batch at all;
    ``make_config`` rejects it) is left out: see ``test_endless_drop_with_no_full_batch``.
    """
    n = draw(st.integers(1, max_n))
    world_size = draw(st.integers(1, min(n, max_world)))
    m = n // world_size
    n_epochs = draw(epochs)
    mode = draw(MODES)
    max_bs = 2 * m + 3 if big_batches and not (n_epochs is None and mode == "drop") else m
    return {
        "n": n,
        "batch_size": draw(st.integers(1, max_bs)),
        "seed": draw(SEEDS),
        "shuffle": draw(st.sampled_from(SHUFFLE_MODES)),
        "block_size": draw(st.integers(1, 6)),
        "epochs": n_epochs,
        "last_batch": mode,
        "rank": draw(st.integers(0, world_size - 1)),
        "world_size": world_size,
    }


def epoch_shard(order: Order, epoch: int) -> np.ndarray:
    """This rank's whole shard of ``epoch``, in order."""
    return order.shard_indices(epoch, 0, order.shard_size)


def epoch_permutation(seed: int, epoch: int, n: int, shuffle: bool | str = True, block_size: int = 3) -> np.ndarray:
    """Epoch ``epoch``'s order of ``range(n)``, unsharded."""
    return epoch_shard(Order(n=n, batch_size=1, seed=seed, shuffle=shuffle, block_size=block_size), epoch)


def as_lists(batches):
    return [np.asarray(batch).tolist() for batch in batches]


def all_batches(order: Order) -> list[list[int]]:
    assert order.num_batches is not None
    return as_lists(order.batch_indices(b) for b in range(order.num_batches))


def model_plan(mode: str, m: int, bs: int, epochs: int) -> list[tuple[int, int, int]]:
    """``(epoch, offset, length)`` of every batch, straight from the docstring's rules."""
    plan = []
    if mode == "wrap":  # ceil(m / bs) full batches per epoch of the loop, cut from the continuous stream
        for b in range(epochs * math.ceil(m / bs)):
            plan.append((b * bs // m, b * bs % m, bs))
    else:
        for epoch in range(epochs):
            last = m if mode == "short" else m - bs + 1
            for offset in range(0, max(last, 0), bs):
                plan.append((epoch, offset, min(bs, m - offset)))
    return plan


# --- 1, 2: epoch permutations -------------------------------------------------------------------


SHUFFLED = st.sampled_from([True, "block"])


@FAST
@given(n=st.integers(1, 200), seed=SEEDS, epoch=st.integers(0, 10**6), shuffle=SHUFFLED, block_size=st.integers(1, 40))
def test_every_shuffled_epoch_is_a_permutation_and_pure(n, seed, epoch, shuffle, block_size):
    order = Order(n=n, batch_size=3, seed=seed, shuffle=shuffle, epochs=None, block_size=block_size)
    shard = epoch_shard(order, epoch)
    assert shard.dtype == np.int64
    assert sorted(shard.tolist()) == list(range(n))
    first = epoch_permutation(seed, epoch, n, shuffle, block_size)
    second = epoch_permutation(seed, epoch, n, shuffle, block_size)
    assert first.tolist() == second.tolist()
    assert shard.tolist() == first.tolist()
    # A fresh object (empty caches) and a second call agree.
    fresh = Order(n=n, batch_size=3, seed=seed, shuffle=shuffle, block_size=block_size)
    assert epoch_shard(fresh, epoch).tolist() == first.tolist()
    assert epoch_shard(order, epoch).tolist() == first.tolist()


@FAST
@given(config=configs(max_n=40, max_world=4), epoch=st.integers(0, 10**6))
@example(
    config={
        **dict(n=37, batch_size=5, seed=0, epochs=1, last_batch="wrap", rank=1, world_size=3),
        "shuffle": "block",
        "block_size": 2,
    },
    epoch=3,
)
def test_every_epoch_is_the_documented_order(config, epoch):
    """Each rank's shard is what docs/design.md describes, computed on its own by ``reference_order``."""
    order = Order(**config)
    expected = reference_order.shard(
        config["seed"],
        epoch,
        config["n"],
        config["rank"],
        config["world_size"],
        config["shuffle"],
        config["block_size"],
    )
    assert epoch_shard(order, epoch).tolist() == expected


@FAST
@given(n=st.integers(10, 200), seed=SEEDS, first_epoch=st.integers(0, 10**6), shuffle=SHUFFLED)
def test_shuffled_epochs_differ(n, seed, first_epoch, shuffle):
    order = Order(n=n, batch_size=1, seed=seed, shuffle=shuffle, block_size=2)
    perms = [tuple(epoch_shard(order, e).tolist()) for e in range(first_epoch, first_epoch + 4)]
    # Four random permutations of >= 10 items are all equal with probability < (1/10!)**3 (blocks of 2:
    # five blocks or more, and windows of at least 10 samples but the last).
    assert len(set(perms)) > 1


@pytest.mark.parametrize("n", [10, 11, 64, 1000])
@pytest.mark.parametrize("epoch", [0, 1, 7])
@pytest.mark.parametrize("shuffle", [True, "block"])
def test_different_seeds_give_different_permutations(n, epoch, shuffle):
    seeds = [0, 1, 2, 42, 12345, 2**31 - 1, 2**63 - 1]
    perms = [tuple(epoch_permutation(seed, epoch, n, shuffle, block_size=2).tolist()) for seed in seeds]
    assert len(set(perms)) == len(seeds)
    assert all(perm != tuple(range(n)) for perm in perms), "shuffle left the data in order"


@FAST
@given(n=st.integers(1, 200), seed=SEEDS, epochs=st.integers(0, 50))
def test_shuffle_off_is_arange_every_epoch(n, seed, epochs):
    order = Order(n=n, batch_size=2, seed=seed, shuffle=False)
    for epoch in [0, 1, epochs, 10**6]:
        assert epoch_shard(order, epoch).tolist() == list(range(n))
    assert epoch_permutation(seed, epochs, n, shuffle=False).tolist() == list(range(n))


# --- 3: shards ------------------------------------------------------------------------------------


@FAST
@given(config=configs(max_n=60, max_world=8), epoch=st.integers(0, 1000))
def test_shards_are_disjoint_equal_and_round_robin(config, epoch):
    n, world_size = config["n"], config["world_size"]
    m = n // world_size
    orders = [Order(**{**config, "rank": rank}) for rank in range(world_size)]
    shards = [epoch_shard(order, epoch).tolist() for order in orders]
    for shard in shards:
        assert len(shard) == m
        assert len(set(shard)) == m
    union = set().union(*map(set, shards))
    assert len(union) == m * world_size  # so the shards are pairwise disjoint
    assert union <= set(range(n))
    # Round-robin from the kept front of the epoch's permutation.
    perm = epoch_permutation(config["seed"], epoch, n, config["shuffle"], config["block_size"]).tolist()
    assert union == set(perm[: m * world_size])
    for rank, shard in enumerate(shards):
        assert shard == perm[: m * world_size][rank::world_size]
    assert len({order.shard_size for order in orders}) == 1
    assert len({order.steps_per_epoch for order in orders}) == 1
    assert len({order.num_batches for order in orders}) == 1
    # Every rank's stream has equal-length batches, batch for batch.
    lengths = [[len(batch) for batch in all_batches(order)] for order in orders]
    assert all(row == lengths[0] for row in lengths)


@FAST
@given(n=st.integers(2, 60), seed=SEEDS, data=st.data())
def test_left_over_samples_change_between_epochs_when_shuffling(n, seed, data):
    world_size = data.draw(st.integers(2, min(n, 6)))
    assume(n % world_size)
    orders = [Order(n=n, batch_size=1, seed=seed, world_size=world_size, rank=r) for r in range(world_size)]
    skipped = []
    for epoch in range(30):
        kept = set().union(*(set(epoch_shard(order, epoch).tolist()) for order in orders))
        skipped.append(frozenset(set(range(n)) - kept))
        assert len(skipped[-1]) == n % world_size
    # 30 epochs all skipping the same samples has probability <= (1/2)**29.
    assert len(set(skipped)) > 1


# --- 4: counts and contents per last_batch mode ---------------------------------------------------


@FAST
@given(config=configs())
@example(
    config={
        "n": 7,
        "batch_size": 20,
        "seed": 3,
        "shuffle": True,
        "epochs": 4,
        "last_batch": "wrap",
        "rank": 0,
        "world_size": 1,
    }
)
@example(
    config={
        "n": 9,
        "batch_size": 5,
        "seed": 3,
        "shuffle": True,
        "epochs": 3,
        "last_batch": "wrap",
        "rank": 1,
        "world_size": 2,
    }
)
def test_wrap_counts_and_contents(config):
    config = {**config, "last_batch": "wrap"}
    order = Order(**config)
    m, bs, epochs = order.shard_size, config["batch_size"], config["epochs"]
    steps = math.ceil(m / bs)
    assert order.steps_per_epoch == steps
    assert order.num_batches == epochs * steps  # an epoch of the loop is steps_per_epoch batches
    batches = all_batches(order)
    assert len(batches) == order.num_batches
    assert all(len(batch) == bs for batch in batches)  # every batch full, the last one too
    # The batches are the continuous stream of data epochs: the E epochs asked for, then up to
    # E * (bs - 1) samples of the epochs after them.
    extra = epochs * steps * bs - epochs * m
    assert 0 <= extra <= epochs * (bs - 1)
    stream = [i for e in range(epochs + extra // m + 1) for i in epoch_shard(order, e).tolist()]
    assert [i for batch in batches for i in batch] == stream[: epochs * steps * bs]


@FAST
@given(config=configs())
@example(
    config={
        "n": 7,
        "batch_size": 20,
        "seed": 3,
        "shuffle": True,
        "epochs": 3,
        "last_batch": "short",
        "rank": 0,
        "world_size": 1,
    }
)
def test_short_counts_and_contents(config):
    config = {**config, "last_batch": "short"}
    order = Order(**config)
    m, bs, epochs = order.shard_size, config["batch_size"], config["epochs"]
    steps = math.ceil(m / bs)
    assert order.steps_per_epoch == steps
    assert order.num_batches == epochs * steps
    batches = all_batches(order)
    for epoch in range(epochs):
        own = batches[epoch * steps : (epoch + 1) * steps]
        assert len(own) == steps
        assert [i for batch in own for i in batch] == epoch_shard(order, epoch).tolist()
        assert all(len(batch) == bs for batch in own[:-1])
        assert len(own[-1]) == m - (steps - 1) * bs
        assert 1 <= len(own[-1]) <= bs


@FAST
@given(config=configs())
@example(
    config={
        "n": 7,
        "batch_size": 20,
        "seed": 3,
        "shuffle": True,
        "epochs": 3,
        "last_batch": "drop",
        "rank": 0,
        "world_size": 1,
    }
)
@example(
    config={
        "n": 8,
        "batch_size": 4,
        "seed": 3,
        "shuffle": True,
        "epochs": 2,
        "last_batch": "drop",
        "rank": 0,
        "world_size": 3,
    }
)
def test_drop_counts_and_contents(config):
    config = {**config, "last_batch": "drop"}
    order = Order(**config)
    m, bs, epochs = order.shard_size, config["batch_size"], config["epochs"]
    steps = m // bs
    assert order.steps_per_epoch == steps
    assert order.num_batches == epochs * steps
    batches = all_batches(order)
    assert len(batches) == epochs * steps
    assert all(len(batch) == bs for batch in batches)
    for epoch in range(epochs):
        own = batches[epoch * steps : (epoch + 1) * steps]
        assert [i for batch in own for i in batch] == epoch_shard(order, epoch).tolist()[: steps * bs]


@FAST
@given(config=configs(), extra=st.integers(1, 30))
def test_batch_size_larger_than_the_shard(config, extra):
    config = {**config, "batch_size": config["n"] // config["world_size"] + extra}
    order = Order(**config)
    m, bs, epochs = order.shard_size, config["batch_size"], config["epochs"]
    batches = all_batches(order)
    if config["last_batch"] == "drop":
        assert order.steps_per_epoch == 0
        assert batches == []
    elif config["last_batch"] == "short":
        assert batches == [epoch_shard(order, e).tolist() for e in range(epochs)]
    else:
        assert order.steps_per_epoch == 1 and len(batches) == epochs  # one full batch per epoch of the loop
        stream = [i for e in range(epochs * bs // m + 1) for i in epoch_shard(order, e).tolist()]
        assert batches == [stream[s : s + bs] for s in range(0, epochs * bs, bs)]
        # The first batch holds all of epoch 0 and the start of epoch 1.
        assert batches[0][:m] == epoch_shard(order, 0).tolist()
        assert batches[0][m : 2 * m] == epoch_shard(order, 1).tolist()[: bs - m]


@FAST
@given(config=configs())
def test_batches_match_the_model_plan(config):
    order = Order(**config)
    plan = model_plan(config["last_batch"], order.shard_size, config["batch_size"], config["epochs"])
    assert order.num_batches == len(plan)
    for b, (epoch, offset, length) in enumerate(plan):
        batch = order.batch_indices(b)
        assert batch.dtype == np.int64
        assert len(batch) == length
        assert batch[0] == epoch_shard(order, epoch)[offset]


# --- 5: resuming and random access ----------------------------------------------------------------


def endless_or_finite(config, cap):
    """Batches to look at: the whole finite stream, or ``cap`` batches of an endless one."""
    order = Order(**config)
    if order.num_batches is None:
        return cap
    return min(order.num_batches, cap)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(max_n=24, epochs=st.one_of(st.none(), st.integers(1, 4))))
def test_resume_at_every_batch_matches_the_uninterrupted_walk(config):
    total = endless_or_finite(config, cap=40)
    walker = Order(**config)
    walked = as_lists(walker.batch_indices(b) for b in range(total))
    # Oracle without any cache reuse: one fresh object per batch.
    assert walked == as_lists(Order(**config).batch_indices(b) for b in range(total))
    for k in range(total + 1):
        resumed = Order(**config)
        assert as_lists(resumed.batch_indices(b) for b in range(k, total)) == walked[k:]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(max_n=24, epochs=st.one_of(st.none(), st.integers(1, 5))), data=st.data())
def test_random_access_matches_the_uninterrupted_walk(config, data):
    total = endless_or_finite(config, cap=60)
    assume(total > 0)
    walked = as_lists(Order(**config).batch_indices(b) for b in range(total))
    requests = data.draw(st.lists(st.integers(0, total - 1), min_size=1, max_size=80), label="requests")
    order = Order(**config)
    for b in requests:
        assert order.batch_indices(b).tolist() == walked[b]
    # And after the jumping around, a full walk on the same object is still unchanged.
    assert as_lists(order.batch_indices(b) for b in range(total)) == walked
    assert as_lists(order.batch_indices(b) for b in reversed(range(total))) == walked[::-1]


@pytest.mark.parametrize("shuffle", SHUFFLE_MODES)
@pytest.mark.parametrize("last_batch", LAST_BATCH_MODES)
@pytest.mark.parametrize(("batch_size", "world_size"), [(1000, 1), (777, 3), (2 * CHUNK_SAMPLES + 1, 2)])
def test_batches_across_chunks(shuffle, last_batch, batch_size, world_size):
    """Shards longer than a chunk: each epoch is still every sample once, the batches cut it as the
    mode says, and any order of asking -- backwards, one batch alone -- gives the same batches."""
    n = 3 * CHUNK_SAMPLES * world_size + 5
    orders = [
        Order(
            n=n,
            batch_size=batch_size,
            seed=11,
            shuffle=shuffle,
            epochs=2,
            last_batch=last_batch,
            rank=rank,
            world_size=world_size,
            block_size=100,
        )
        for rank in range(world_size)
    ]
    for order in orders:
        walked = all_batches(order)
        assert as_lists(order.batch_indices(b) for b in reversed(range(order.num_batches))) == walked[::-1]
        for b in (0, order.num_batches // 2, order.num_batches - 1):
            assert dataclasses.replace(order).batch_indices(b).tolist() == walked[b]  # fresh caches
        if last_batch != "wrap":
            steps = order.steps_per_epoch
            for epoch in range(2):
                samples = [i for batch in walked[epoch * steps : (epoch + 1) * steps] for i in batch]
                assert samples == epoch_shard(order, epoch).tolist()[: len(samples)]
    for epoch in range(2):
        union = [i for order in orders for i in epoch_shard(order, epoch).tolist()]
        assert len(union) == len(set(union)) == n - n % world_size


# --- 6: the ends of the stream --------------------------------------------------------------------


@FAST
@given(config=configs(epochs=st.one_of(st.none(), st.integers(1, 4))), below=st.integers(1, 10**9))
def test_negative_batch_numbers_raise(config, below):
    order = Order(**config)
    with pytest.raises(IndexError):
        order.batch_indices(-below)
    with pytest.raises(IndexError):
        order.batch_indices(-1)


@FAST
@given(config=configs(), past=st.integers(0, 10**9))
def test_batches_past_a_finite_stream_raise(config, past):
    order = Order(**config)
    total = order.num_batches
    assert total is not None
    with pytest.raises(IndexError):
        order.batch_indices(total)
    with pytest.raises(IndexError):
        order.batch_indices(total + past)
    if total:
        assert len(order.batch_indices(total - 1)) >= 1


@FAST
@given(config=configs(epochs=st.none(), big_batches=False), far=st.integers(10**6, 10**6 + 1000))
def test_endless_streams_give_batches_far_out(config, far):
    order = Order(**config)
    assert order.num_batches is None
    m, bs = order.shard_size, config["batch_size"]
    batch = order.batch_indices(far).tolist()
    assert set(batch) <= set(range(config["n"]))
    if config["last_batch"] == "short":
        last_of_epoch = far % order.steps_per_epoch == order.steps_per_epoch - 1
        assert len(batch) == (m - (order.steps_per_epoch - 1) * bs if last_of_epoch else bs)
    else:
        assert len(batch) == bs
    if config["last_batch"] == "wrap":
        positions = range(far * bs, (far + 1) * bs)
        assert batch == [int(epoch_shard(order, p // m)[p % m]) for p in positions]
    else:
        epoch, j = divmod(far, order.steps_per_epoch)
        assert batch == epoch_shard(order, epoch).tolist()[j * bs : (j + 1) * bs]


@FAST
@given(
    n=st.integers(2, 60),
    seed=SEEDS,
    data=st.data(),
    epochs=st.one_of(st.none(), st.integers(2, 6)),
    shuffle=st.booleans(),
)
def test_wrap_batches_straddle_epoch_boundaries(n, seed, data, epochs, shuffle):
    world_size = data.draw(st.integers(1, max(1, min(n // 2, 4))), label="world_size")
    m = n // world_size
    bs = data.draw(st.integers(2, 2 * m + 2), label="batch_size")
    last_epoch = (epochs or 50) - 1
    e = data.draw(st.integers(1, last_epoch), label="boundary")
    assume((m * e) % bs != 0)  # otherwise a batch ends exactly at the boundary
    order = Order(
        n=n,
        batch_size=bs,
        seed=seed,
        shuffle=shuffle,
        epochs=epochs,
        last_batch="wrap",
        rank=0,
        world_size=world_size,
    )
    b = (m * e - 1) // bs
    assert (m * e) // bs == b
    batch = order.batch_indices(b).tolist()
    i = m * e - 1 - b * bs  # where position m*e - 1 sits in the batch
    assert batch[i] == epoch_shard(order, e - 1).tolist()[-1]
    assert batch[i + 1] == epoch_shard(order, e).tolist()[0]


@pytest.mark.parametrize("mode", LAST_BATCH_MODES)
def test_hand_checked_endless_boundary(mode):
    order = Order(n=5, batch_size=2, seed=0, shuffle=False, epochs=None, last_batch=mode)
    expected = {
        "wrap": [[0, 1], [2, 3], [4, 0], [1, 2], [3, 4], [0, 1]],
        "short": [[0, 1], [2, 3], [4], [0, 1], [2, 3], [4]],
        "drop": [[0, 1], [2, 3], [0, 1], [2, 3], [0, 1], [2, 3]],
    }[mode]
    assert as_lists(order.batch_indices(b) for b in range(6)) == expected
    assert order.num_batches is None


# --- 7: hand-checked plans ------------------------------------------------------------------------

HAND_CHECKED = {
    # n=5, batch_size=2, shuffle off, 2 epochs: each epoch is [0, 1, 2, 3, 4]; wrap: 3 full batches an epoch.
    "wrap": [[0, 1], [2, 3], [4, 0], [1, 2], [3, 4], [0, 1]],
    "short": [[0, 1], [2, 3], [4], [0, 1], [2, 3], [4]],
    "drop": [[0, 1], [2, 3], [0, 1], [2, 3]],
}


@pytest.mark.parametrize("mode", LAST_BATCH_MODES)
def test_hand_checked_n5_bs2_two_epochs(mode):
    order = Order(n=5, batch_size=2, seed=123, shuffle=False, epochs=2, last_batch=mode)
    expected = HAND_CHECKED[mode]
    assert order.num_batches == len(expected)
    assert all_batches(order) == expected
    with pytest.raises(IndexError):
        order.batch_indices(len(expected))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # Two ranks of five samples: the front four, [0, 1, 2, 3], dealt out; sample 4 is skipped.
        ({"rank": 0, "world_size": 2, "batch_size": 2, "epochs": 2}, [[0, 2], [0, 2]]),
        ({"rank": 1, "world_size": 2, "batch_size": 2, "epochs": 2}, [[1, 3], [1, 3]]),
        # A shard of two, batches of three: one full batch per epoch of the loop, spanning data epochs.
        ({"rank": 1, "world_size": 2, "batch_size": 3, "epochs": 3}, [[1, 3, 1], [3, 1, 3], [1, 3, 1]]),
        # batch_size 4, three epochs of five: two full batches an epoch, 24 samples (9 of data epochs 3, 4).
        (
            {"batch_size": 4, "epochs": 3},
            [[0, 1, 2, 3], [4, 0, 1, 2], [3, 4, 0, 1], [2, 3, 4, 0], [1, 2, 3, 4], [0, 1, 2, 3]],
        ),
        # batch_size 7 > 5: one full batch an epoch, each spanning data epochs.
        ({"batch_size": 7, "epochs": 2}, [[0, 1, 2, 3, 4, 0, 1], [2, 3, 4, 0, 1, 2, 3]]),
    ],
)
def test_hand_checked_wrap_plans(kwargs, expected):
    order = Order(n=5, seed=9, shuffle=False, last_batch="wrap", **kwargs)
    assert all_batches(order) == expected


def test_hand_checked_large_batch_short_and_drop():
    short = Order(n=5, batch_size=7, seed=9, shuffle=False, epochs=2, last_batch="short")
    assert all_batches(short) == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    drop = Order(n=5, batch_size=7, seed=9, shuffle=False, epochs=2, last_batch="drop")
    assert drop.num_batches == 0
    assert all_batches(drop) == []
    with pytest.raises(IndexError):
        drop.batch_indices(0)


def test_endless_drop_with_no_full_batch():
    finite = Order(n=5, batch_size=7, seed=9, shuffle=False, epochs=2, last_batch="drop")
    with pytest.raises(IndexError):
        finite.batch_indices(0)
    endless = Order(n=5, batch_size=7, seed=9, shuffle=False, epochs=None, last_batch="drop")
    with pytest.raises(IndexError):
        endless.batch_indices(0)


@given(
    n=st.integers(1, 60),
    batch_size=st.integers(1, 20),
    epochs=st.integers(1, 4),
    last_batch=st.sampled_from(["wrap", "short"]),
)
@settings(max_examples=60, deadline=None)
def test_batch_length_matches_the_indices(n, batch_size, epochs, last_batch):
    order = Order(n=n, batch_size=batch_size, seed=1, epochs=epochs, last_batch=last_batch)
    for b in range(order.num_batches):
        assert order.batch_length(b) == len(order.batch_indices(b))


@FAST
@given(config=configs(epochs=st.one_of(st.none(), st.integers(1, 4))), data=st.data())
def test_epoch_end_is_the_next_multiple_of_steps_per_epoch(config, data):
    order = Order(**config)
    assume(order.steps_per_epoch > 0)
    b = data.draw(st.integers(0, 10**6), label="batch")
    end = order.epoch_end(b)
    assert end % order.steps_per_epoch == 0 and end - order.steps_per_epoch <= b < end
