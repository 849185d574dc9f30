"""The public API: data_generator, Loader's options, length, position, state and lifecycle."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
from helpers import ALPHABET_X, ALPHABET_Y, as_list

import prefetch
from prefetch.core.order import Order


def expected_alphabet(seed: int, batches: int, batch_size: int = 3) -> list:
    order = Order(n=26, batch_size=batch_size, seed=seed)
    return [
        ([ALPHABET_X[i] for i in order.batch_indices(b)], [ALPHABET_Y[i] for i in order.batch_indices(b)])
        for b in range(batches)
    ]


@pytest.mark.parametrize("workers", [0, 2])
def test_data_generator_is_the_seed_alphabet_example(workers):
    gen = prefetch.data_generator(3, ALPHABET_X, ALPHABET_Y, shuffle=True, seed=5, workers=workers)
    assert isinstance(gen, types.GeneratorType)
    batches = [next(gen) for _ in range(20)]  # 60 samples: more than two epochs of 26
    gen.close()
    assert [(list(x), list(y)) for x, y in batches] == expected_alphabet(5, 20)
    for x, y in batches:
        assert isinstance(x, list) and len(x) == 3
        assert [c.upper() for c in x] == y
    seen = [c for x, _ in batches[:9] for c in x][:26]
    assert sorted(seen) == ALPHABET_X  # the first 26 samples are one whole epoch


def test_data_generator_straddles_epochs_without_shuffle():
    gen = prefetch.data_generator(4, ALPHABET_X, ALPHABET_Y, shuffle=False, workers=0)
    batches = [next(gen) for _ in range(7)]
    gen.close()
    assert batches[6] == (["y", "z", "a", "b"], ["Y", "Z", "A", "B"])


def test_data_generator_validates_at_call_time():
    with pytest.raises(ValueError, match="batch_size"):
        prefetch.data_generator(0, ALPHABET_X, ALPHABET_Y)


def test_collate_list_gives_the_seed_lists():
    x = np.arange(10)
    with prefetch.Loader(x, x * 2, batch_size=4, shuffle=False, epochs=1, collate="list", workers=0) as loader:
        first = next(iter(loader))
    assert isinstance(first, tuple) and isinstance(first[0], list)
    assert [int(v) for v in first[0]] == [0, 1, 2, 3] and [int(v) for v in first[1]] == [0, 2, 4, 6]


@pytest.mark.parametrize(
    ("last_batch", "sizes"),
    [("wrap", [4, 4, 4, 4, 4, 4]), ("short", [4, 4, 3, 4, 4, 3]), ("drop", [4, 4, 4, 4])],
)
def test_last_batch_modes_and_len(last_batch, sizes):
    x = np.arange(11)
    with prefetch.Loader(x, batch_size=4, epochs=2, last_batch=last_batch, workers=2, seed=1) as loader:
        assert len(loader) == len(sizes) // 2  # batches per epoch
        batches = list(loader.stream())
    assert [len(b) for b in batches] == sizes
    assert loader.steps_per_epoch == (2 if last_batch == "drop" else math.ceil(11 / 4))


def test_an_endless_loader_has_a_len_per_epoch():
    with prefetch.Loader(np.arange(5), batch_size=2, workers=0) as loader:
        assert len(loader) == loader.steps_per_epoch == 3


def test_seed_none_draws_a_readable_seed():
    a = prefetch.Loader(np.arange(5), batch_size=2, workers=0)
    b = prefetch.Loader(np.arange(5), batch_size=2, workers=0, seed=a.seed)
    assert isinstance(a.seed, int)
    assert as_list(next(iter(a))) == as_list(next(iter(b)))
    a.close()
    b.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_iter_continues_from_the_loaders_position(workers):
    x = np.arange(100)
    with prefetch.Loader(x, batch_size=5, epochs=1, seed=3, workers=workers) as loader:
        first = [b.tolist() for _, b in zip(range(4), loader)]
        rest = [b.tolist() for b in loader]
    with prefetch.Loader(x, batch_size=5, epochs=1, seed=3, workers=0) as reference:
        everything = [b.tolist() for b in reference]
    assert first + rest == everything
    assert loader.position == 20


@pytest.mark.parametrize(("saved_workers", "resumed_workers"), [(2, 0), (0, 2), (2, 1)])
def test_state_dict_resumes_exactly(saved_workers, resumed_workers):
    x = np.arange(50, dtype=np.float32)
    options = dict(batch_size=4, epochs=3, transform=lambda v: v + np.random.rand())
    with prefetch.Loader(x, workers=0, seed=11, **options) as reference:
        everything = [b.tolist() for b in reference.stream()]
    with prefetch.Loader(x, workers=saved_workers, seed=11, **options) as loader:
        head = [b.tolist() for _, b in zip(range(17), loader.stream())]
        state = loader.state_dict()
    assert state["position"] == 17 and len(repr(state)) < 400  # small: no data
    with prefetch.Loader(x, workers=resumed_workers, **options) as resumed:  # seed comes from the state
        resumed.load_state_dict(state)
        tail = [b.tolist() for b in resumed.stream()]
    assert head + tail == everything


def test_load_state_dict_names_the_field_that_differs():
    x = np.arange(20)
    with prefetch.Loader(x, batch_size=4, workers=0) as loader:
        state = loader.state_dict()
    with prefetch.Loader(x, batch_size=5, workers=0) as other, pytest.raises(ValueError, match="batch_size=4"):
        other.load_state_dict(state)


def test_closed_loader_says_it_is_closed():
    loader = prefetch.Loader(np.arange(10), batch_size=2, workers=2)
    next(iter(loader))
    loader.close()
    loader.close()  # a no-op
    with pytest.raises(prefetch.LoaderClosedError, match="closed"):
        iter(loader)


def test_a_newer_iterator_supersedes_the_older():
    with prefetch.Loader(np.arange(40), batch_size=2, workers=2, seed=0) as loader:
        old = iter(loader)
        next(old)
        new = iter(loader)
        assert (
            next(new).tolist()
            == prefetch.Loader(np.arange(40), batch_size=2, workers=0, seed=0).config.order.batch_indices(1).tolist()
        )
        with pytest.raises(RuntimeError, match="superseded"):
            next(old)


def test_dropping_the_generator_stops_its_processes():
    gen = prefetch.data_generator(2, np.arange(10), np.arange(10), workers=2)
    next(gen)
    del gen  # the no_leaks fixture asserts the processes and segments are gone


def test_stats_report_the_run():
    with prefetch.Loader(np.arange(200.0), batch_size=10, epochs=1, workers=2, transform=lambda v: v * 2) as loader:
        batches = list(loader)
        stats = loader.stats()
    assert stats.batches == len(batches) == 20 and stats.samples == 200
    assert 0.0 <= stats.wait_fraction <= 1.0 and stats.batches_per_s > 0
    assert stats.worker_busy and all(0.0 <= share <= 1.0 for share in stats.worker_busy.values())
    assert "throughput" in str(stats) and stats.to_dict()["samples"] == 200


def test_stats_report_the_memory_of_every_process_while_running():
    with prefetch.Loader(np.arange(200.0), batch_size=10, workers=2) as loader:
        batches = iter(loader)
        next(batches)
        memory = loader.stats().memory
    workers = [role for role in memory if role.startswith("worker ")]
    assert len(workers) == 2 and memory["consumer"] > 0 and memory["coordinator"] > 0
    rss_total = sum(size for role, size in memory.items() if role != "uss_total")
    assert 0 < memory["uss_total"] < rss_total  # forked processes share most of their pages


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 5, 8, 32])
def test_default_prefetch_is_a_multiple_of_the_workers(workers):
    # batches come back in order: a worker holding one more than the others makes them all wait
    loader = prefetch.Loader(np.arange(10), batch_size=2, workers=workers)
    assert loader.prefetch % workers == 0 and loader.prefetch >= 2 * workers
    loader.close()
