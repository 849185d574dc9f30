"""``background``: run an existing sequential generator in one background process, ahead of the loop.

The smallest step from a plain generator: nothing in it changes, it just runs in
another process while the training loop works on the previous items::

    gen = prefetch.background(data_generator(32, x_train, y_train), depth=2)
    model.fit(gen, steps_per_epoch=len(x_train) // 32, epochs=10)

How it works::

    consumer (your process)                       producer process (forked)
    -----------------------                       -------------------------
    background(...) generator                     holds `depth` slots (credits)
                                                  waits for a free slot, then next(iterable)
                                                  writes the item's arrays into the slot
       <------------- Item(slot, written) ------  (shared memory), pickles the rest
    copies the arrays out of the slot
    ------------- Credit(slot) ------------->     the slot is free again
       <------------- End() / Failed(failure) --  exhausted / the iterable raised

At most ``depth`` items are made ahead (a slot is taken *before* ``next`` runs),
so memory stays bounded however slow the loop is. Items come in the iterable's
order. Arrays cross through shared memory (``processes.slots.SlotWriter`` / ``SlotReader``),
never pickled; the consumer copies them out of the slot (one ``memcpy``), so an
item the user holds never changes. An exception in the iterable is re-raised in
the consumer with its own type and the producer's traceback as ``__cause__``.

The producer is forked, so a generator *object* (which cannot be pickled) is
inherited as it is, with the module state it sees; it continues from the consumer's
``random`` and ``np.random`` states at the first ``next()``, so a generator seeded
with ``random.seed(...)`` yields the same items as when run inline (the consumer's
own states do not advance meanwhile). Where fork does not
exist, pass a zero-argument function that returns the iterable instead; it is
pickled (with dill) to a spawned process.

Segments are named ``prefetch-<consumer pid>-<token>-...`` like a Loader's (see
``docs/design.md``, *Shutdown*): closing, exhausting or dropping the generator, an
exception, or interpreter exit stop the process and unlink them; a producer whose
consumer died exits by itself and unlinks them (``PR_SET_PDEATHSIG`` sends it SIGTERM,
and it polls its parent while it waits).

Use ``Loader`` instead when one process is not enough: it runs many workers,
deterministically, and yields arrays without any copy.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import weakref
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import Failure, WorkerDiedError, describe_exit

if TYPE_CHECKING:
    from .processes.segments import PrefixLock
    from .processes.slots import SlotReader

__all__ = ["background"]

# How often a waiting side rechecks that the other side is still alive.
POLL_S = 0.25
# How long a producer told to stop may take to exit before it is killed.
JOIN_TIMEOUT_S = 2.0


# --- messages -----------------------------------------------------------------------------


class Item(NamedTuple):
    """Producer -> consumer: the next item is in ``slot``, laid out as ``layout`` says."""

    slot: int
    layout: Any  # processes.messages.SlotLayout


class End(NamedTuple):
    """Producer -> consumer: the iterable is exhausted."""


class Failed(NamedTuple):
    """Producer -> consumer: the iterable raised; ``failure`` packs the exception and its traceback."""

    failure: Failure


class Credit(NamedTuple):
    """Consumer -> producer: ``slot`` was read and may be written again."""

    slot: int


class Stop(NamedTuple):
    """Consumer -> producer: stop now."""


# --- the producer process -----------------------------------------------------------------


def _fork_available() -> bool:
    import multiprocess

    return "fork" in multiprocess.get_all_start_methods()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the iterable to _produce's cleanup


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the consumer dies; it becomes SystemExit, so the segments get unlinked."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the parent poll still works
        pass


def _random_states() -> tuple[Any, Any]:
    """The consumer's ``random`` and ``np.random`` states, for the producer to continue from."""
    numpy = sys.modules.get("numpy")
    return random.getstate(), (numpy.random.get_state() if numpy is not None else None)


def _adopt_random_states(states: tuple[Any, Any]) -> None:
    # A forked child's `random` is reseeded at fork (and a spawned one starts afresh): continue from the
    # consumer's states instead, so the iterable's randomness is what it would be if it ran inline.
    python_state, numpy_state = states
    random.setstate(python_state)
    if numpy_state is not None:
        import numpy

        numpy.random.set_state(numpy_state)


def _produce(
    source: Any, make: bool, depth: int, prefix: str, conn: Any, parent_pid: int, states: tuple[Any, Any]
) -> None:
    """The producer's life: take a free slot, make the next item into it, send it; until told to stop."""
    from .processes.segments import unlink_prefix
    from .processes.slots import SlotWriter

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the consumer's to handle
    _die_with_parent()
    _adopt_random_states(states)
    writer = SlotWriter(prefix)
    free = list(range(depth))
    try:
        iterator = iter(source() if make else source)
        while True:
            while not free:
                if conn.poll(POLL_S):
                    message = conn.recv()
                    if isinstance(message, Stop):
                        return
                    free.append(message.slot)
                elif os.getppid() != parent_pid:
                    return  # orphaned: the consumer died
            slot = free.pop()
            try:
                item = next(iterator)
            except StopIteration:
                conn.send(End())
                return
            written = writer.write(slot, writer.space(slot, None, 0), item)
            conn.send(Item(slot, written))
    except Exception as exc:
        with contextlib.suppress(OSError):
            conn.send(Failed(Failure.capture(exc, "the background iterable")))
    finally:
        # The consumer unlinks the segments when it stops us; if it is gone, nobody else will.
        if os.getppid() != parent_pid:
            unlink_prefix(prefix)


# --- the consumer side --------------------------------------------------------------------


class _Producer:
    """The consumer's handle on the producer process; stopping it is idempotent and also runs at exit."""

    def __init__(self, source: Any, make: bool, depth: int):
        import multiprocess

        from .processes.segments import claim_prefix, remove_stale_segments

        remove_stale_segments()  # left by consumers that were killed (their producers clean up too)

        context = multiprocess.get_context("fork" if _fork_available() else "spawn")
        prefix_lock = claim_prefix()  # marks the segments as alive until _stop (see segments.PrefixLock)
        self.prefix = prefix_lock.prefix
        self.conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(
            target=_produce,
            args=(source, make, depth, self.prefix, child_conn, os.getpid(), _random_states()),
            name="prefetch-background",
            daemon=True,
        )
        self.process.start()
        child_conn.close()
        self.items = 0
        self._stop = weakref.finalize(self, _stop, self.process, self.conn, prefix_lock)

    def next_item(self, reader: SlotReader) -> tuple[bool, Any]:
        """``(True, item)``, or ``(False, None)`` once the iterable is exhausted."""
        from multiprocess.connection import wait

        while True:
            ready = wait([self.conn, self.process.sentinel], timeout=POLL_S)
            if self.conn in ready or self.conn.poll():
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):  # the pipe closed under us: the process is gone
                    raise self._died() from None
                break
            if ready:  # the sentinel, with nothing left to read
                raise self._died()
        if isinstance(message, End):
            return False, None
        if isinstance(message, Failed):
            raise message.failure.to_exception(self.items, (), self.process.pid)
        item, _ = reader.read(message.slot, message.layout, lease=False)
        with contextlib.suppress(OSError):  # a producer that died meanwhile is noticed at the next wait
            self.conn.send(Credit(message.slot))
        self.items += 1
        return True, item

    def _died(self) -> WorkerDiedError:
        self.process.join(JOIN_TIMEOUT_S)
        return WorkerDiedError(
            f"the background process (pid {self.process.pid}) {describe_exit(self.process.exitcode)}, "
            f"while making item {self.items}",
            batch=self.items,
            pid=self.process.pid,
        )

    def stop(self) -> None:
        self._stop()


def _stop(process: Any, conn: Any, prefix_lock: PrefixLock) -> None:
    """Tell the producer to stop, escalate to kill, then unlink every segment it made, and the lock."""
    with contextlib.suppress(OSError, ValueError):
        conn.send(Stop())
    process.join(JOIN_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join(JOIN_TIMEOUT_S)
    with contextlib.suppress(OSError):
        conn.close()
    prefix_lock.release()


def background(iterable: Iterable[Any] | Callable[[], Iterable[Any]], depth: int = 2) -> Generator[Any, None, None]:
    """Run ``iterable`` (e.g. a plain generator) in one background process; yield its items in order.

    ``iterable`` is any iterable, or a zero-argument function returning one (needed
    where fork does not exist). At most ``depth`` items are made ahead. The result is
    a real generator (Keras ``fit`` accepts it); the process starts at its first
    ``next()`` and stops when it is exhausted, closed or dropped.

    Example::

        gen = prefetch.background(data_generator(32, x_train, y_train))
        model.fit(gen, steps_per_epoch=len(x_train) // 32, epochs=10)
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1 (items made ahead); got {depth!r}")
    make = callable(iterable) and not hasattr(iterable, "__iter__")
    if not make and not hasattr(iterable, "__iter__"):
        raise TypeError(
            "background takes an iterable (e.g. a generator) or a function returning one; "
            f"got {type(iterable).__name__}"
        )
    if not make and not _fork_available():
        raise RuntimeError(
            "prefetch.background needs the fork start method to run a generator object (it cannot be pickled), "
            "and fork is not available here; pass a zero-argument function that returns the iterable instead, "
            "e.g. background(lambda: data_generator(32, x, y))"
        )
    return _run(iterable, make, depth)


def _run(source: Any, make: bool, depth: int) -> Generator[Any, None, None]:
    producer: _Producer | None = None
    try:
        from .processes.slots import SlotReader

        producer = _Producer(source, make, depth)
        reader = SlotReader()
        while True:
            more, item = producer.next_item(reader)
            if not more:
                return
            yield item
    finally:
        if producer is not None:
            producer.stop()
