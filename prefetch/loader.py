"""``Loader`` and ``data_generator``: what the user iterates, and the top of the data path.

A loader holds its validated configuration and its position; its generators (``iter(loader)``: one
epoch, ``stream()``: all of them) take batches from an engine (``consumer``) that drives the executor
``executor=`` names, strictly by batch number, so the stream is the same for any number of workers
and any executor. One thread iterates a loader at a time; ``close()`` works from any thread; the
engine is kept between epochs (``holder``). See ``docs/design.md`` ("The layout", "Epochs",
"Threads and forks").
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Generator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from ._tuning import settle_training_threads
from .cache import open_cache
from .core.config import GeneratorOptions, LoaderConfig, LoaderOptions
from .errors import ConcurrentIterationError, IteratorSupersededError, LoaderClosedError, LoaderExhaustedError
from .holder import EngineHolder
from .stats import Stats, StatsRecorder
from .validation import make_config

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack is 3.11+; annotations are strings, never evaluated

    from .consumer import Engine, InlineEngine
    from .executor import Executor

# How long close() waits for another thread that is starting an engine for this loader.
CLOSE_WAIT_S = 10.0

# The generators ``iter(loader)``, ``loader.stream()`` and ``data_generator`` returned -> their loader, for
# ``Loader.of``. An entry lives as long as its generator, and keeps the loader (which never refers to the
# generator) that long: a running generator's frame holds it anyway.
_loader_of: weakref.WeakKeyDictionary[Generator[Any, None, None], Loader] = weakref.WeakKeyDictionary()


T = TypeVar("T")


class _FromConfig(Generic[T]):
    """A read-only attribute of ``Loader``: the option of the same name, as its configuration holds it."""

    def __init__(self, doc: str):
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, loader: None, owner: type | None = None) -> _FromConfig[T]: ...

    @overload
    def __get__(self, loader: Loader, owner: type | None = None) -> T: ...

    def __get__(self, loader: Loader | None, owner: type | None = None) -> T | _FromConfig[T]:
        return self if loader is None else getattr(loader.config, self.name)

    def __set__(self, loader: Loader, value: object) -> None:
        raise AttributeError(f"{self.name} is read-only: it is loader.config.{self.name}")


class Loader:
    """Batches from map-style sources, made ahead of time by a pool of worker processes.

    ``Loader(*sources, batch_size=32, ...)``: with one source a sample is
    ``source[i]``; with several it is ``(s1[i], s2[i], ...)`` and a batch is a tuple
    of collated parts. ``iter(loader)`` is one epoch, continuing from the loader's
    position (``len(loader)`` batches from an epoch boundary); ``loader.stream()`` is every
    remaining epoch in one generator. The batch sequence is fixed by ``seed`` whatever
    ``workers``, ``prefetch`` or start method. See ``docs/api.md`` for every option.

    Example::

        with prefetch.Loader(images, labels, batch_size=64, epochs=10, transform=augment) as loader:
            for epoch in range(10):
                for x, y in loader:
                    train_step(x, y)
    """

    def __init__(self, *sources: Any, **options: Unpack[LoaderOptions]):
        self._config: LoaderConfig = open_cache(make_config(sources, **options))
        from .processes.spawn import check_picklable

        check_picklable(self._config)  # spawn/forkserver: what the coordinator cannot receive fails here
        self._position = 0
        self._closed = False
        self._holder: EngineHolder[InlineEngine | Engine] = EngineHolder()
        self._newest_iterator: object | None = None
        # Held while a generator of this loader takes a batch: a second thread that tries
        # meanwhile gets ConcurrentIterationError instead of a share of the engine.
        self._turn = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop, self._holder, self._config.store)

    # --- what the loader is -------------------------------------------------------------

    @property
    def config(self) -> LoaderConfig:
        """The validated configuration (frozen): every option as the loader uses it, ``config.order``
        (which samples make up each batch) and the memory bound (``config.max_slots``)."""
        return self._config

    @property
    def engine(self) -> Engine | InlineEngine | None:
        """The engine (None when stopped; kept between the epochs of an epoch loop): its ``stats()``,
        ``worker_pids()`` and ``helper_pid()`` (the coordinator), for monitoring and fault injection."""
        return self._holder.engine

    seed: _FromConfig[int] = _FromConfig("The seed of the order and of the transforms' randomness (drawn when None).")
    batch_size: _FromConfig[int] = _FromConfig(
        "Samples per batch (the last of an epoch may have fewer: ``last_batch``)."
    )
    workers: _FromConfig[int] = _FromConfig("Worker processes (or actors) making batches; 0: in the calling process.")
    prefetch: _FromConfig[int] = _FromConfig("Batches ready or in flight ahead of the consumer, at most.")

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch of this rank's shard: ``ceil(shard / batch_size)`` (``drop``: ``floor``);
        ``len(loader)``, and what one ``for batch in loader`` yields from an epoch boundary."""
        return self._config.order.steps_per_epoch

    @property
    def position(self) -> int:
        """Batches yielded so far (over all iterations): the next batch's number."""
        return self._position

    def __len__(self) -> int:
        """Batches per epoch (``steps_per_epoch``), endless loaders too, as ``DataLoader``'s ``len``."""
        return self._config.order.steps_per_epoch

    def __repr__(self) -> str:
        c = self._config
        return (
            f"Loader(n={c.n}, batch_size={c.batch_size}, shuffle={c.shuffle}, seed={c.seed}, epochs={c.epochs}, "
            f"last_batch={c.last_batch!r}, workers={c.workers}, prefetch={c.prefetch}, position={self._position}"
            f"{', closed' if self._closed else ''})"
        )

    # --- iterating ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LoaderClosedError("this Loader is closed; create a new one (or resume one with load_state_dict)")

    def _check_left(self) -> None:
        """``LoaderExhaustedError`` when a finite loader has yielded all its epochs."""
        order = self._config.order
        if order.num_batches is not None and self._position >= order.num_batches:
            raise LoaderExhaustedError(
                f"this Loader has yielded all its epochs: {order.epochs} of {order.steps_per_epoch} batches each "
                f"({order.num_batches} batches), so another iteration would yield nothing. Pass a larger epochs= "
                "(or epochs=None for as many epochs as the loop asks for), make a new Loader, or load_state_dict() "
                "a saved position"
            )

    def __iter__(self) -> Generator[Any, None, None]:
        """One epoch: the batches from the loader's position to the end of its epoch (a whole epoch from an
        epoch boundary); the next ``iter`` yields the next epoch. ``LoaderExhaustedError`` when none is left."""
        self._check_open()
        self._check_left()
        return self._generate(owns_loader=False, one_epoch=True)

    def stream(self) -> Generator[Any, None, None]:
        """Every remaining batch, from the loader's position to the end of its last epoch (endless with
        ``epochs=None``): one generator for Keras ``fit`` or one loop over all epochs."""
        self._check_open()
        self._check_left()
        return self._generate(owns_loader=False, one_epoch=False)

    def _generate(self, owns_loader: bool, one_epoch: bool) -> Generator[Any, None, None]:
        me = object()
        self._newest_iterator = me
        generator = self._run(me, owns_loader, one_epoch)
        _loader_of[generator] = self
        return generator

    def _end(self, one_epoch: bool) -> int | None:
        """Where an iteration that starts at the loader's position ends: its epoch's end, or the stream's."""
        order = self._config.order
        if not one_epoch:
            return order.num_batches
        end = order.epoch_end(self._position)
        return end if order.num_batches is None else min(end, order.num_batches)

    @classmethod
    def of(cls, source: Any) -> Loader:
        """The ``Loader`` behind ``source``: ``source`` itself if it is one, or the loader whose ``iter(loader)``,
        ``loader.stream()`` or ``prefetch.data_generator`` made the generator ``source`` (even once it is
        exhausted or closed). For tools that get what the user passed to ``fit`` and want the figures
        (``prefetch.keras.StallMonitor``): ``Loader.of(gen).stats()``. Raises ``TypeError`` otherwise.
        """
        if isinstance(source, cls):
            return source
        try:
            loader = _loader_of.get(source)
        except TypeError:  # not weakly referenceable (or not hashable): certainly not ours
            loader = None
        if loader is None:
            raise TypeError(
                "expected a prefetch.Loader, or a generator that iter(loader), loader.stream() or "
                "prefetch.data_generator returned; "
                f"got {type(source).__name__}"
            )
        return loader

    def _run(self, me: object, owns_loader: bool, one_epoch: bool) -> Generator[Any, None, None]:
        """The generator behind ``iter(loader)`` (``one_epoch``) and ``stream()``; it owns the engine while
        it runs, and parks it when its epoch ends with more to come (see ``holder``).

        A newer ``iter(loader)`` in the same thread takes the engine over (this one then
        raises), and ``load_state_dict`` stops it (this one then goes on from the new
        position, to the end of that position's epoch). One from another thread, while this one
        owns the engine, raises ``ConcurrentIterationError`` and leaves this one alone: a loader is
        iterated by one thread at a time (one generator may still be resumed from different threads in turn).
        """
        end, at = self._end(one_epoch), self._position
        finished = False
        try:
            while True:
                if self._position != at:  # load_state_dict moved the loader
                    end = self._end(one_epoch)
                if end is not None and self._position >= end:
                    break
                self._take_turn()
                try:
                    self._check_open()
                    made = [self._own_engine(me).next_batch()]
                    self._position += 1
                    at = self._position
                finally:
                    self._turn.release()
                # Popped as it is yielded: no local keeps the user's last batch (and its slot and
                # mapping) alive while the generator is suspended, even after close().
                yield made.pop()
            finished = True
        finally:
            if self._holder.owner is me:
                total = self._config.order.num_batches
                if finished and (total is None or self._position < total) and not self._closed:
                    self._holder.park()  # the next epoch's iteration adopts it
                else:
                    self._holder.stop(keep_stats=True)
            if owns_loader:
                self.close()
            settle_training_threads(getattr(self._holder.last, "tuner", None))  # this thread's torch setting

    def _own_engine(self, me: object) -> InlineEngine | Engine:
        """The engine, owned by the generator ``me``: its own, a parked one it adopts, or a new one."""
        holder = self._holder
        if holder.owner is not me:
            if self._newest_iterator is not me:
                raise IteratorSupersededError(
                    "this iterator was superseded by a newer iter(loader) of the same loader: "
                    "iterate the newest one (or give each loop its own Loader)"
                )
            if self._owned_by_another_live_thread():
                raise ConcurrentIterationError(
                    "another thread is iterating this loader: a loader is iterated by one thread at "
                    "a time (close that iteration first, give each thread its own Loader, or hand "
                    "batches over with a queue)"
                )
            if not holder.adopt(me, self._position):
                holder.stop()
                holder.install(self._start_engine(), me)
                if self._closed:  # close() ran in another thread meanwhile
                    holder.stop()
                    self._check_open()
        engine = holder.engine
        assert engine is not None
        holder.thread = threading.current_thread()
        return engine

    def _owned_by_another_live_thread(self) -> bool:
        """Whether a generator that last ran in another thread, still alive, owns the engine."""
        holder = self._holder
        thread = holder.thread
        return (
            holder.owner is not None
            and thread is not None
            and thread is not threading.current_thread()
            and thread.is_alive()
        )

    def _take_turn(self) -> None:
        if not self._turn.acquire(blocking=False):
            raise ConcurrentIterationError(
                "another thread is taking a batch from this loader right now: a loader is iterated by one "
                "thread at a time (give each thread its own Loader, or hand batches over with a queue)"
            )

    def _start_engine(self) -> InlineEngine | Engine:
        # Imported here: multiprocess (and dill) cost more to import than all the rest.
        from .consumer import Engine, InlineEngine

        if self._config.workers == 0:
            return InlineEngine(self._config, self._position)
        return Engine(self._config, self._position, self._executor())

    def _executor(self) -> Executor:
        """The executor ``executor=`` names, or the one it is: a template, whose ``start`` makes the
        engine's run (every iteration starts from the template's options alone)."""
        choice = self._config.executor
        if choice == "processes":
            from .processes import ProcessExecutor

            return ProcessExecutor()
        if choice == "ray":
            from .ray_executor import RayExecutor

            return RayExecutor()
        return choice

    # --- state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The loader's position: small, no data. ``load_state_dict`` on a fresh loader of the
        same configuration continues with exactly the next batch."""
        return self._config.saved_state(self._position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (the saved seed is adopted; any running iteration stops)."""
        self._check_open()
        seed, position = self._config.resumed(state)
        self._take_turn()
        try:
            self._holder.stop()
            self._config = replace(self._config, seed=seed)  # and its order
            self._position = position
        finally:
            self._turn.release()

    # --- profiling and lifecycle --------------------------------------------------------

    def stats(self) -> Stats:
        """Figures of the current (or last) iteration: throughput, data stall, worker use, memory."""
        holder = self._holder
        if holder.engine is None and holder.final is not None:
            return holder.final  # the iteration ended: its figures as it stopped
        engine = holder.engine or holder.last
        if engine is None:
            return StatsRecorder(self._config.provenance).snapshot([], None)
        return engine.stats()

    def close(self) -> None:
        """Stop the workers and the coordinator and free all shared memory. Idempotent.

        Any thread may call it: a ``next()`` blocked in another thread raises ``LoaderClosedError``
        at once, and everything is stopped and freed when ``close()`` returns. In a process forked
        from the one that made the loader it frees nothing: the loader is the parent's.
        """
        self._closed = True
        stopped = self._holder.stop(keep_stats=True)  # takes it first: no generator's own clean-up races this one
        if not stopped and self._turn.locked() and self._turn.acquire(timeout=CLOSE_WAIT_S):
            self._turn.release()  # another thread was starting an engine: it has stopped it again
        _close_store(self._config.store)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _close_store(store: Any) -> None:
    """Free a cache's store (``cache="memory"``: unlink its segments) once its engine has stopped."""
    if store is not None:
        store.close()


def _stop(holder: EngineHolder[Any], store: Any) -> None:
    """A dropped loader's end: its engine first, then its cache (no worker writes to a removed cache)."""
    holder.stop()
    _close_store(store)


def data_generator(
    batch_size: int, data_x: Any, data_y: Any, shuffle: bool | str = True, **options: Unpack[GeneratorOptions]
) -> Generator[tuple[Any, Any], None, None]:
    """The seed's ``data_generator``, in parallel: an endless generator of ``(batch_x, batch_y)``.

    Same positional parameters as the plain generator; batches straddle epoch
    boundaries. ``options`` are ``Loader``'s (``transform``, ``workers``, ...). It is
    ``Loader(data_x, data_y, ...).stream()`` owning its loader: a real generator, as Keras
    ``fit`` requires; closing it (or dropping it) stops its processes.

    Example::

        gen = prefetch.data_generator(32, x_train, y_train, transform=augment)
        model.fit(gen, steps_per_epoch=len(x_train) // 32, epochs=10, shuffle=False)
    """
    loader = Loader(data_x, data_y, batch_size=batch_size, shuffle=shuffle, **options)
    return loader._generate(owns_loader=True, one_epoch=False)
