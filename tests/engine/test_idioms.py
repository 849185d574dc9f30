"""The loop idioms give exactly the batches they ask for, or fail loudly (PRODUCT.md 3.1b).

* The DataLoader loop ``for epoch in range(E): for batch in loader`` gets ``len(loader)`` batches per
  epoch: with ``last_batch="short"``/``"drop"`` each epoch is that epoch's permutation (every sample
  once; ``drop`` without the remainder), with ``"wrap"`` every batch is full and the loop's batches
  are the first ones of the continuous, epoch-straddling stream.
* ``loader.stream()`` is every remaining batch of every remaining epoch in one generator.
* ``len(loader)`` is the batches of one epoch, endless loaders too.
* An epoch loop that asks a finite loader for one epoch more raises ``LoaderExhaustedError``.
* Resume mid-epoch continues the epoch loop where it was; the engine is kept between epochs
  and stopped by everything that stopped it before.

The expected batches are derived here from the documented rule (``docs/design.md``, "Order and
determinism": epoch ``e``'s order is the bijection ``reference_order`` computes on its own from that
description, rank ``r`` of ``w`` takes entries ``r, r + w, ...`` of its first ``n - n % w``), not from
``core.order``.
"""

from __future__ import annotations

import gc
import itertools
import math
import threading
import time

import numpy as np
import pytest
import reference_order
from helpers import alive, all_gone, reap, run_script, wait_until

import prefetch

N = 23  # not a multiple of the batch size, nor of the world size
BATCH = 5
SEED = 7
E = 3  # epochs asked for by the loops below (of an endless loader too)
MODES = ("wrap", "short", "drop")


def shard(epoch: int, rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s samples of data epoch ``epoch``, in order."""
    return reference_order.shard(SEED, epoch, N, rank, world_size)


def batches_per_epoch(last_batch: str, world_size: int) -> int:
    size = N // world_size
    return size // BATCH if last_batch == "drop" else math.ceil(size / BATCH)


def wrap_stream(count: int, rank: int, world_size: int) -> list[list[int]]:
    """The first ``count`` batches of the continuous stream: data epochs one after another, cut every BATCH."""
    samples: list[int] = []
    epoch = 0
    while len(samples) < count * BATCH:
        samples += shard(epoch, rank, world_size)
        epoch += 1
    return [samples[i * BATCH : (i + 1) * BATCH] for i in range(count)]


def check_epochs(epochs: list[list[list[int]]], last_batch: str, rank: int, world_size: int) -> None:
    """The batches of each loop epoch are what the contract says for ``last_batch``."""
    steps = batches_per_epoch(last_batch, world_size)
    assert [len(epoch) for epoch in epochs] == [steps] * len(epochs)
    if last_batch == "wrap":
        assert all(len(batch) == BATCH for epoch in epochs for batch in epoch)
        assert [batch for epoch in epochs for batch in epoch] == wrap_stream(len(epochs) * steps, rank, world_size)
        return
    for number, epoch in enumerate(epochs):
        samples = [i for batch in epoch for i in batch]
        expected = shard(number, rank, world_size)
        if last_batch == "drop":
            expected = expected[: steps * BATCH]
            assert all(len(batch) == BATCH for batch in epoch)
        assert samples == expected  # that epoch's permutation, each sample once


def make(last_batch: str, epochs: int | None, rank: int = 0, world_size: int = 1, **options) -> prefetch.Loader:
    options = {"seed": SEED, **options}
    return prefetch.Loader(
        np.arange(N),
        batch_size=BATCH,
        epochs=epochs,
        last_batch=last_batch,
        rank=rank,
        world_size=world_size,
        **options,
    )


CASES = [
    pytest.param(last_batch, epochs, world_size, workers, id=f"{last_batch}-epochs{epochs}-ws{world_size}-w{workers}")
    for last_batch in MODES
    for epochs in (1, E, None)
    for world_size in (1, 2)
    for workers in (0, 2)
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("last_batch", "epochs", "world_size", "workers"), CASES)
def test_the_epoch_loop_gets_len_batches_per_epoch(last_batch, epochs, world_size, workers):
    loops = epochs or E
    for rank in range(world_size):
        with make(last_batch, epochs, rank, world_size, workers=workers) as loader:
            got = []
            for _epoch in range(loops):
                got.append([batch.tolist() for batch in loader])
                assert len(got[-1]) == len(loader)
            check_epochs(got, last_batch, rank, world_size)
            assert loader.position == loops * len(loader)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("last_batch", "epochs", "world_size", "workers"), CASES)
def test_stream_is_every_epoch_in_one_generator(last_batch, epochs, world_size, workers):
    for rank in range(world_size):
        with make(last_batch, epochs, rank, world_size, workers=workers) as loader:
            steps = len(loader)
            stream = loader.stream()
            taken = [batch.tolist() for batch in itertools.islice(stream, (epochs or E) * steps)]
            if epochs is not None:
                assert next(stream, None) is None  # the stream ends with the last epoch
            else:
                assert next(stream) is not None  # an endless one goes on
            stream.close()
            check_epochs([taken[k * steps : (k + 1) * steps] for k in range(epochs or E)], last_batch, rank, world_size)


@pytest.mark.parametrize("last_batch", MODES)
@pytest.mark.parametrize("epochs", [1, E, None])
def test_len_is_the_batches_of_one_epoch_endless_loaders_too(last_batch, epochs):
    with make(last_batch, epochs, workers=0) as loader:
        assert len(loader) == loader.steps_per_epoch == batches_per_epoch(last_batch, 1)
        for _epoch in range(epochs or E):
            assert sum(1 for _ in loader) == len(loader)  # one full epoch-iteration


@pytest.mark.timeout(60)
@pytest.mark.parametrize("last_batch", MODES)
@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_more_than_the_loader_has_raises(last_batch, workers):
    with make(last_batch, E, workers=workers) as loader:
        done = 0
        with pytest.raises(prefetch.LoaderExhaustedError, match=f"all its epochs: {E} of") as raised:
            for _epoch in range(E + 1):
                for _batch in loader:
                    pass
                done += 1
        assert done == E and loader.position == E * len(loader)
        assert "epochs=None" in str(raised.value) and "load_state_dict" in str(raised.value)
        with pytest.raises(prefetch.LoaderExhaustedError):
            loader.stream()
        assert isinstance(raised.value, prefetch.PrefetchError) and isinstance(raised.value, RuntimeError)


@pytest.mark.parametrize("last_batch", MODES)
def test_a_finite_wrap_loader_has_only_full_batches(last_batch):
    with make(last_batch, 2, workers=0) as loader:
        sizes = [len(batch) for batch in loader.stream()]
    steps = batches_per_epoch(last_batch, 1)
    assert len(sizes) == 2 * steps
    if last_batch == "short":
        assert sizes == ([BATCH] * (steps - 1) + [N % BATCH]) * 2
    else:
        assert sizes == [BATCH] * (2 * steps)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("last_batch", MODES)
@pytest.mark.parametrize(("saved_workers", "resumed_workers"), [(0, 2), (2, 0)])
def test_resume_mid_epoch_then_the_epoch_loop(last_batch, saved_workers, resumed_workers):
    """A state saved in the middle of epoch 1 resumes the rest of that epoch, then whole epochs."""
    with make(last_batch, E, workers=0) as reference:
        everything = [[batch.tolist() for batch in reference] for _ in range(E)]
    steps = len(everything[0])
    with make(last_batch, E, workers=saved_workers) as loader:
        head = [[batch.tolist() for batch in loader]]
        head.append([batch.tolist() for batch in itertools.islice(loader, 2)])
        state = loader.state_dict()
    assert state["position"] == steps + 2
    with make(last_batch, E, workers=resumed_workers, seed=None) as resumed:
        resumed.load_state_dict(state)
        tail = []
        for _epoch in range(E - 1):  # the rest of epoch 1, then epoch 2
            tail.append([batch.tolist() for batch in resumed])
        with pytest.raises(prefetch.LoaderExhaustedError):
            iter(resumed)
    assert tail[0] == everything[1][2:] and len(tail[0]) == steps - 2
    assert head[0] + head[1] + tail[0] + tail[1] == [b for epoch in everything for b in epoch]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_load_state_dict_during_an_epoch_goes_on_to_the_end_of_the_new_epoch(workers):
    with make("short", None, workers=0) as reference:
        epochs = [[batch.tolist() for batch in reference] for _ in range(3)]
    with make("short", None, workers=workers) as loader:
        steps = len(loader)
        for _batch in loader:  # epoch 0
            pass
        state = loader.state_dict()  # at the start of epoch 1
        for _batch in loader:  # epoch 1
            pass
        iterator = iter(loader)  # epoch 2 ...
        assert next(iterator).tolist() == epochs[2][0]
        loader.load_state_dict(state)  # ... moved back to the start of epoch 1
        assert [batch.tolist() for batch in iterator] == epochs[1]  # to its end, not two epochs' worth
        assert loader.position == 2 * steps


@pytest.mark.timeout(60)
def test_the_engine_is_kept_between_epochs_and_stopped_at_the_last():
    with make("wrap", E, workers=2) as loader:
        for _batch in loader:
            pass
        engine, pids = loader.engine, loader.engine.worker_pids()
        assert engine is not None and all(alive(pid) for pid in pids)
        stats = loader.stats()
        assert stats.batches == len(loader)
        assert loader.stats().elapsed_s == stats.elapsed_s  # the figures as the epoch ended: the clock stopped
        for _batch in loader:
            pass
        assert loader.engine is engine  # adopted: no process start-up, the prefetch window kept
        assert loader.engine.worker_pids() == pids
        for _batch in loader:  # the last epoch ends the stream: the engine stops
            pass
        assert loader.engine is None
        wait_until(all_gone(pids))
        assert loader.stats().batches == E * len(loader)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stopper", ["close", "load_state_dict", "garbage", "break"])
def test_a_kept_engine_is_stopped(stopper):
    loader = make("short", None, workers=2)
    for _batch in loader:
        pass
    pids = loader.engine.worker_pids()
    if stopper == "close":
        loader.close()
    elif stopper == "load_state_dict":
        loader.load_state_dict(loader.state_dict())
    elif stopper == "garbage":
        del loader
        gc.collect()
    else:
        for _batch in loader:  # a loop left after the first batch of epoch 1 stops the engine, as before
            break
        assert loader.engine is None
        with make("short", None, workers=0) as reference:
            rest_of_epoch_1 = [batch.tolist() for batch in itertools.islice(reference.stream(), 6, 10)]
        assert [batch.tolist() for batch in loader] == rest_of_epoch_1  # the next loop yields the rest of it
    wait_until(all_gone(pids))
    if stopper != "garbage":
        loader.close()


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:.*threads running in this process:prefetch.PrefetchWarning")
def test_an_epoch_in_another_thread_starts_its_own_engine():
    with make("wrap", None, workers=0) as reference:
        expected = [[batch.tolist() for batch in reference] for _ in range(2)]
    with make("wrap", None, workers=2) as loader:
        first = [batch.tolist() for batch in loader]
        parked = loader.engine
        second: list = []
        thread = threading.Thread(target=lambda: second.extend(batch.tolist() for batch in loader))
        thread.start()
        thread.join()
        assert loader.engine is not parked  # the tuner works in the loop's thread: no adoption across threads
        assert [first, second] == expected


def test_loader_of_finds_the_loader_behind_an_epoch_and_a_stream():
    loader = make("wrap", None, workers=0)
    epoch, stream = iter(loader), loader.stream()
    assert prefetch.Loader.of(epoch) is loader and prefetch.Loader.of(stream) is loader
    loader.close()


PARKED_AT_EXIT_SCRIPT = """
import sys

import numpy as np

import prefetch

if __name__ == "__main__":
    loader = prefetch.Loader(np.arange(40), batch_size=4, workers=2, start_method=sys.argv[1])
    for epoch in range(2):
        for batch in loader:
            pass
    engine = loader.engine  # kept for a third epoch that never comes; nobody closes the loader
    print(" ".join(map(str, [engine.helper_pid(), *engine.worker_pids()])), flush=True)
"""


@pytest.mark.timeout(60)
@pytest.mark.start_methods("fork", "forkserver")
def test_a_kept_engine_is_stopped_at_exit(tmp_path, start_method):
    process = run_script(tmp_path, "parked.py", PARKED_AT_EXIT_SCRIPT, start_method)
    pids: list[int] = []
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        assert line, process.communicate(timeout=30)[1]
        pids = [int(pid) for pid in line.split()]
        started = time.monotonic()
        _, err = process.communicate(timeout=30)
        assert time.monotonic() - started < 10, "the interpreter's exit waited for the kept engine"
        assert process.returncode == 0 and "Traceback" not in err, err
        wait_until(all_gone(pids, process.pid), timeout_s=5)
    finally:
        reap(process, pids, 30)


@pytest.mark.timeout(60)
def test_an_epoch_loop_keeps_the_thread_tuner_across_epochs(fake_torch):
    """Epochs shorter than the tuner's measurement: with the engine kept between epochs the tuner measures
    across them and decides (with an engine per epoch it would start over every epoch and never decide)."""
    from prefetch._tuning import TUNE_MAX_BLOCKS, TUNE_WARMUP_BATCHES, TUNE_WINDOW_BATCHES

    measured = TUNE_WARMUP_BATCHES + TUNE_MAX_BLOCKS * 4 * TUNE_WINDOW_BATCHES  # the longest it may measure
    # worker_nice=0: a step back would make the tuner start over (reconsider), on this machine's timing
    options = {"batch_size": 4, "seed": 0, "workers": 2, "train_threads": "auto", "worker_nice": 0}
    with prefetch.Loader(np.arange(96.0), **options) as loader:
        assert len(loader) < measured
        for _epoch in range(math.ceil(measured / len(loader)) + 1):
            for _batch in loader:
                pass
        decided = [line for line in loader.stats().decisions if line.startswith("training threads")]
    assert decided, loader.stats().decisions
    assert fake_torch.calls[:2] == [2, 1] and fake_torch.threads == 2  # switched, then given back at close
