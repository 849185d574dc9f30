"""The batch pipeline, and batch number ``b`` made the way every executor must make it.

``make_numbered_batch`` is the executor contract as code: batch ``b``'s indices from the order, the
global generators seeded for ``b`` (``rng``; restored after in the calling process), then
``make_batch`` -- load, transform, collate, ``batch_transform``. Every executor (a worker process, a
Ray actor) and ``workers=0`` call it, so they all make the same bytes. It touches no process, pipe
or shared memory: where the batch's arrays are stacked is the caller's ``alloc``.

Every exception user code raises while a batch is made -- any ``BaseException`` subclass,
``KeyboardInterrupt`` included -- comes out as ``UserCodeRaised``, packed as a ``Failure`` naming the
stage and the sample, and is raised in the consumer as itself; it is never mistaken for a worker
crash, so user code never runs twice because of it. ``SystemExit`` is the one exception:
``sys.exit()`` in user code ends a worker process, like ``os._exit()``, and is handled as a worker
death. See ``docs/design.md`` ("Where a new executor goes", "Failures").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np

from ..errors import Failure
from . import readahead, rng, threaded
from .aliasing import SourceMemory
from .collate import Alloc, StreamingStack, collate_auto, collate_list, private_alloc
from .config import LoaderConfig
from .hedging import ReadHedging


class Timings(NamedTuple):
    """Seconds spent on one batch, by stage: the one record from whoever makes a batch to ``Stats``.

    ``transfer`` is the time to hand the made batch over (a worker: writing it into its slot).
    """

    load: float = 0.0
    transform: float = 0.0
    collate: float = 0.0
    transfer: float = 0.0


# A batch's loads already started, and the generators' states when they were seeded (``_make_reading_ahead``).
Started = tuple[readahead.Loads, threaded.GlobalDraws]


class UserCodeRaised(Exception):
    """User code raised while a batch was made: ``failure`` is the exception packed for the trip to the
    consumer, ``original`` the exception itself (raised as it is with ``workers=0``)."""

    def __init__(self, failure: Failure, original: BaseException):
        super().__init__(failure.text)
        self.failure = failure
        self.original = original


def _fast_path(config: LoaderConfig, sources: tuple[Any, ...]) -> bool:
    """Whole-batch ``np.take`` is the same as per-sample loading and stacking for plain arrays."""
    return (
        config.transform is None
        and config.load is None
        and config.store is None
        and config.collate == "auto"
        and all(isinstance(s, np.ndarray) and not s.dtype.hasobject for s in sources)
    )


def _take(sources: tuple[Any, ...], indices: np.ndarray, alloc: Alloc) -> Any:
    parts = []
    for source in sources:
        out = alloc((len(indices), *source.shape[1:]), source.dtype)
        parts.append(np.take(source, indices, axis=0, out=out, mode="clip"))
    return parts[0] if len(parts) == 1 else tuple(parts)


def _collate_fn(config: LoaderConfig) -> Callable[[list[Any], Alloc], Any]:
    if config.collate == "auto":
        return collate_auto
    if config.collate == "list":
        return collate_list
    user_collate = config.collate
    assert callable(user_collate)
    return lambda samples, alloc: user_collate(samples)


def _transform_all(
    config: LoaderConfig, samples: list[Any], indices: np.ndarray, alloc: Alloc
) -> StreamingStack | None:
    """Transform ``samples`` in place; with ``collate="auto"``, stack each into the batch as it
    comes (``StreamingStack``) and return the stack, or None if the samples were kept instead."""
    transform = config.transform
    assert transform is not None
    stack: StreamingStack | None = None
    position = 0
    with _user_code(lambda: f"transform of sample {int(indices[position])}"):
        for position, sample in enumerate(samples):
            sample = transform(sample)
            if position == 0 and config.collate == "auto" and StreamingStack.accepts(sample):
                stack = StreamingStack(sample, len(samples), alloc)
            if stack is not None:
                if stack.push(sample):
                    samples[position] = None  # its memory is reused, still in cache, by the next sample
                    continue
                samples[:position] = stack.rows_as_samples()  # does not match: collate the usual way
                stack = None
            samples[position] = sample
    return stack


@contextmanager
def _user_code(where: Callable[[], str]) -> Iterator[None]:
    """Run user code: what it raises comes out as ``UserCodeRaised`` naming ``where()`` (computed only
    then). ``SystemExit`` passes: ``sys.exit()`` in user code ends a worker (module docstring)."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException as exc:  # any user exception, KeyboardInterrupt too
        raise UserCodeRaised(Failure.capture(exc, where()), exc) from exc


def _load(sources: tuple[Any, ...], indices: np.ndarray) -> list[Any]:
    """One sample per index, one after another: ``source[i]``, or ``(s1[i], s2[i], ...)`` with several sources."""
    samples: list[Any] = []
    index = -1
    with _user_code(lambda: f"loading sample {index}"):
        if len(sources) == 1:
            source = sources[0]
            for index in indices.tolist():
                samples.append(source[index])
        elif len(sources) == 2:  # (x, y): the common case, without a generator per sample
            first, second = sources
            for index in indices.tolist():
                samples.append((first[index], second[index]))
        else:
            for index in indices.tolist():
                samples.append(tuple(source[index] for source in sources))
    return samples


def _load_threaded(config: LoaderConfig, indices: np.ndarray, started: Started | None) -> list[Any]:
    """The first stage (``_sample_loader``) per index with ``io_threads`` threads (late reads hedged with
    ``hedge=True``), or the loads ``started`` already; a load that drew from the batch's generators while the
    calling thread waited fails the batch."""
    if started is None:
        draws = threaded.GlobalDraws()  # before the loads start
        loads = readahead.Loads(_sample_loader(config), indices.tolist(), config.io_threads, _read_rule(config))
    else:
        loads, draws = started
    with _user_code(lambda: f"loading sample {loads.failed_index}"):
        samples = loads.result()
    with _user_code(lambda: f"loading samples {indices.tolist()}"):
        draws.check(*_draw_words(config))
    return samples


def _read_rule(config: LoaderConfig) -> ReadHedging | None:
    """When a read is late (``hedge=True``): the loader's ``ReadHedging`` in this process."""
    return readahead.rule_for(config) if config.hedge else None


def _draw_words(config: LoaderConfig) -> tuple[str, str]:
    """What threaded the loads, and the fix, for ``GlobalDraws.check``'s message."""
    if not config.hedge:
        return "io_threads > 1", "io_threads=1"
    if config.io_threads == 1:
        return "hedge=True", "hedge=False"
    return "io_threads > 1 and hedge=True", "io_threads=1 and hedge=False"


def _load_hedged(config: LoaderConfig, indices: np.ndarray) -> list[Any]:
    """``hedge=True`` with one thread: read through ``readahead.Loads`` while the reads are unmeasured (the first
    batch) or measured slow enough to repay the thread; else as without hedging, timed as a whole."""
    rule = readahead.rule_for(config)
    if rule.active():
        return _load_threaded(config, indices, None)
    start = time.perf_counter()
    if config.load is not None or config.store is not None:
        samples = _load_staged(config, indices)
    else:
        samples = _load(config.sources, indices)
    rule.measured_batch(time.perf_counter() - start, len(indices), 1)
    return samples


def _sample_loader(config: LoaderConfig) -> Callable[[int], Any]:
    """Sample ``i`` as the pipeline's first stage sees it: ``source[i]`` (or a tuple of the sources'), through
    ``load=`` and the ``cache=`` store when they are set (``docs/design.md``, "Decode once")."""
    sources, load, store = config.sources, config.load, config.store
    if len(sources) == 1:
        read: Callable[[int], Any] = sources[0].__getitem__
    else:
        read = lambda i: tuple(source[i] for source in sources)  # noqa: E731
    if load is None and store is None:
        return read

    def load_once(index: int) -> Any:
        if store is not None:
            found, sample = store.get(index)
            if found:
                return sample
        sample = read(index)
        if load is not None:
            sample = load(sample)
        if store is not None:
            store.put(index, sample)
        return sample

    return load_once


def _load_staged(config: LoaderConfig, indices: np.ndarray) -> list[Any]:
    """``load=`` and ``cache=``: each sample from the store if it keeps it, else ``load(source sample)``,
    which the store then keeps if it has room; one after another, as ``_load``."""
    load_one = _sample_loader(config)
    samples: list[Any] = []
    index = -1
    with _user_code(lambda: f"loading sample {index}"):
        for index in indices.tolist():
            samples.append(load_one(index))
    return samples


def make_batch(
    config: LoaderConfig,
    indices: np.ndarray,
    alloc: Alloc = private_alloc,
    private: SourceMemory | None = None,
    started: Started | None = None,
) -> tuple[Any, Timings]:
    """Batch ``indices``: load each sample, transform it, collate, then ``batch_transform``.

    The caller seeds the random generators first (``make_numbered_batch`` does). User-code exceptions
    come out as ``UserCodeRaised`` naming the stage and the sample index. With ``private`` (the calling
    process, ``workers=0``) the parts of the batch that alias a source are copied, as a
    worker's slot would (see ``SourceMemory``); the whole-batch ``np.take`` never aliases.
    ``started``: the batch's loads, already started (``readahead``), and the generators as they were seeded.
    """
    load_s = transform_s = collate_s = 0.0
    safety = None
    if private is not None:
        safety = private.for_batch()
        alloc = safety.alloc
    start = time.perf_counter()
    if _fast_path(config, config.sources):
        batch = _take(config.sources, indices, alloc)
        load_s = time.perf_counter() - start
    else:
        if started is not None or (config.io_threads > 1 and len(indices) > 1):
            samples = _load_threaded(config, indices, started)
        elif config.hedge and len(indices) > 1:
            samples = _load_hedged(config, indices)
        elif config.load is not None or config.store is not None:
            samples = _load_staged(config, indices)
        else:
            samples = _load(config.sources, indices)
        if safety is not None:
            safety.add(samples)  # before a transform replaces them
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        stacked = None
        if config.transform is not None:
            stacked = _transform_all(config, samples, indices, alloc)
            transform_s = time.perf_counter() - start
            start = time.perf_counter()
        if stacked is not None:
            batch = stacked.result()
        else:
            with _user_code(lambda: f"collate of samples {indices.tolist()}"):
                batch = _collate_fn(config)(samples, alloc)
        collate_s = time.perf_counter() - start
    if config.batch_transform is not None:
        start = time.perf_counter()
        with _user_code(lambda: f"batch_transform of samples {indices.tolist()}"):
            batch = config.batch_transform(batch)
        transform_s += time.perf_counter() - start
    if safety is not None:
        batch = safety.detach(batch)
    return batch, Timings(load_s, transform_s, collate_s)


def make_numbered_batch(
    config: LoaderConfig,
    batch: int,
    indices: np.ndarray | None = None,
    alloc: Alloc = private_alloc,
    private: SourceMemory | None = None,
    ahead: tuple[int, np.ndarray] | None = None,
) -> tuple[Any, Timings]:
    """Batch number ``batch``, made as every executor must make it (the module docstring):

    * from its sample indices, ``config.order.batch_indices(batch)`` (or ``indices``, the same ones as
      they travelled to a worker);
    * with the global generators seeded for ``batch`` first when user code runs
      (``config.runs_user_code``): ``rng.seed_globals``, or, in the calling process (``private`` given:
      ``workers=0``), ``rng.seeded_in_caller``, which gives the caller its own states back after;
    * by ``make_batch``: user code's exceptions come out as ``UserCodeRaised``.

    ``ahead``: the batch this process makes next and its indices, if known (a worker's next task): with
    ``io_threads > 1`` its loads start now, behind this batch's (``readahead``); the next call takes them.
    """
    if indices is None:
        indices = config.order.batch_indices(batch)
    if not config.runs_user_code:
        return make_batch(config, indices, alloc, private)
    if private is not None:
        with rng.seeded_in_caller(config.seed, batch):
            return make_batch(config, indices, alloc, private)
    if config.io_threads == 1 or _fast_path(config, config.sources):
        rng.seed_globals(config.seed, batch)
        return make_batch(config, indices, alloc)
    return _make_reading_ahead(config, batch, indices, alloc, ahead)


def _make_reading_ahead(
    config: LoaderConfig, batch: int, indices: np.ndarray, alloc: Alloc, ahead: tuple[int, np.ndarray] | None
) -> tuple[Any, Timings]:
    """``make_batch`` with ``io_threads > 1`` in a process that reads ahead: this batch's loads taken from the
    read-ahead (or started), the next batch's started behind them, the generators watched in between."""
    listed = indices.tolist()
    rule = _read_rule(config)
    with _user_code(lambda: f"loading samples {listed}"):
        loads = readahead.take_ahead(batch, listed, _draw_words(config))
    rng.seed_globals(config.seed, batch)
    draws = threaded.GlobalDraws()
    load_one = _sample_loader(config)
    if loads is None:
        loads = readahead.Loads(load_one, listed, config.io_threads, rule)
    if ahead is not None:
        readahead.start_ahead(ahead[0], load_one, ahead[1].tolist(), config.io_threads, rule)
    try:
        return make_batch(config, indices, alloc, started=(loads, draws))
    finally:
        readahead.quiet_now()
