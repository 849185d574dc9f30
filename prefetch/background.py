"""``background``: run an existing sequential generator in one background process, ahead of the loop.

The smallest step from a plain generator: nothing in it changes, it just runs in
another process while the training loop works on the previous items::

    gen = prefetch.background(data_generator(32, x_train, y_train), depth=2)
    model.fit(gen, steps_per_epoch=len(x_train) // 32, epochs=10)

It runs on the engine's parts, not beside them: the messages are ``processes.messages``'s,
they travel as ``processes.channel`` frames, items cross in ``processes.slots`` slots under a
``processes.segments`` prefix, and the producer lives and ends by ``lifetime``.
How it works::

    consumer (your process)                       producer process (forked)
    -----------------------                       -------------------------
    background(...) generator                     holds `depth` slots (credits)
                                                  takes a free slot, then next(iterable),
                                                  writes the item's arrays into the slot
       <--------- ItemReady(slot, layout) ------  (shared memory), pickles the rest
    copies the arrays out of the slot
    ----------- SlotFree(slot) ------------->     the slot is free again
       <------ Exhausted() / ItemFailed(...) --   exhausted / the iterable raised
    ----------- Stop() --------------------->     (closing) stop between two items

Two one-way pipes carry them (``items`` and ``credits``): the producer writes each message
in one atomic write (``channel.send``, spilling a large one, e.g. a long traceback, to a
file), the consumer reads with a ``PipeReader`` and answers through an ``Outbox``, so
neither ever waits for the other to read.

At most ``depth`` items are made ahead (a slot is taken *before* ``next`` runs),
so memory stays bounded however slow the loop is. Items come in the iterable's
order. Arrays cross through shared memory (``SlotWriter`` / ``SlotReader``), never
pickled; the consumer copies them out of the slot (one ``memcpy``), so an item the
user holds never changes. An exception in the iterable is re-raised in the consumer
with its own type and the producer's traceback as ``__cause__``.

The producer is forked, so a generator *object* (which cannot be pickled) is
inherited as it is, with the module state it sees; it continues from the consumer's
``random``, ``np.random`` and (when torch is imported) torch's CPU generator states at
the first ``next()``, so a generator seeded with ``random.seed(...)`` or
``torch.manual_seed(...)`` yields the same items as when run inline (the consumer's own
states do not advance meanwhile); it runs torch with one thread (see
``lifetime.one_torch_thread``), and warns about threads running at the fork. With
``start_method="spawn"`` (and where fork does not exist) pass a zero-argument
function that returns the iterable instead; it is pickled (with dill) to a spawned
process, which copies no lock another thread holds and gets the same random states
(torch's as bytes, set there if unpickling the function imported torch).

Segments are named ``prefetch-<consumer pid>-<token>-...`` like a Loader's (see
``docs/design.md``, *Shutdown*): closing, exhausting or dropping the generator, an
exception, or interpreter exit stop the process (``Stop``, then ``join_or_kill``) and
unlink them; a producer whose consumer died exits by itself and unlinks them
(``exit_with_parent``: even in the middle of an item, whichever consumer thread started
it; and it polls its parent while it waits).

Use ``Loader`` instead when one process is not enough: it runs many workers,
deterministically, and yields arrays without any copy.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import sys
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .core.rng import torch_generator
from .errors import Failure, ForkUnavailableError, WorkerDiedError, describe_exit

if TYPE_CHECKING:  # the processes modules are imported when a producer starts, not with prefetch
    from .processes.channel import Outbox
    from .processes.messages import Message
    from .processes.segments import PrefixLock
    from .processes.slots import SlotReader

__all__ = ["background"]


# --- the producer process -----------------------------------------------------------------


def _fork_available() -> bool:
    import multiprocess

    return "fork" in multiprocess.get_all_start_methods()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the iterable to _produce's cleanup


def _random_states() -> tuple[Any, Any, bytes | None]:
    """The consumer's ``random``, ``np.random`` and torch CPU generator states, for the producer to
    continue from. torch's travels as bytes: unpickling it must not import torch in a spawned producer."""
    numpy = sys.modules.get("numpy")
    generator = torch_generator()
    torch_state = generator.get_state().numpy().tobytes() if generator is not None else None
    return random.getstate(), (numpy.random.get_state() if numpy is not None else None), torch_state


def _adopt_random_states(states: tuple[Any, Any, bytes | None]) -> None:
    # A forked child's `random` is reseeded at fork (and a spawned one starts afresh): continue from the
    # consumer's states instead, so the iterable's randomness is what it would be if it ran inline.
    python_state, numpy_state, torch_state = states
    random.setstate(python_state)
    if numpy_state is not None:
        import numpy

        numpy.random.set_state(numpy_state)
    generator = torch_generator()  # a spawned producer has torch if unpickling the iterable imported it
    if torch_state is not None and generator is not None:
        torch = sys.modules["torch"]
        generator.set_state(torch.frombuffer(bytearray(torch_state), dtype=torch.uint8))


class _Credits:
    """The producer's free slots: ``depth`` at first, and one more with each ``SlotFree``."""

    def __init__(self, conn: Any, depth: int, parent_pid: int):
        from .processes.channel import PipeReader

        self.inbox = PipeReader(conn)
        self.poller = select.poll()
        self.poller.register(self.inbox.fileno(), select.POLLIN)
        self.free = list(range(depth))
        self.parent_pid = parent_pid
        self.stopped = False  # told to stop, or the consumer is gone

    def take(self) -> int | None:
        """A free slot, waiting for one while there is none; None once the producer is to stop."""
        from .lifetime import PARENT_CHECK_INTERVAL_S

        self._read()  # every time: a Stop is seen between items, and credits never pile up in the pipe
        while not self.free and not self.stopped:
            if self.poller.poll(round(PARENT_CHECK_INTERVAL_S * 1000)):
                self._read()
            elif os.getppid() != self.parent_pid:
                self.stopped = True  # orphaned: the consumer died
        return None if self.stopped else self.free.pop()

    def _read(self) -> None:
        from .processes.messages import SlotFree, Stop

        try:
            arrived = self.inbox.read_available()
        except (EOFError, OSError):  # the consumer's end is closed
            arrived, self.stopped = [], True
        for message in arrived:
            if isinstance(message, SlotFree):
                self.free.append(message.slot)
            elif isinstance(message, Stop):
                self.stopped = True


def _produce(
    source: Any,
    make: bool,
    depth: int,
    prefix: str,
    items: Any,
    credits: Any,
    parent_pid: int,
    forked: bool,
    states: tuple[Any, Any, bytes | None],
) -> None:
    """The producer's life: take a free slot, make the next item into it, send it; until told to stop."""
    from .lifetime import exit_with_parent, ignore_sigint, one_torch_thread
    from .processes.channel import send
    from .processes.messages import Exhausted, ItemFailed, ItemReady
    from .processes.segments import unlink_prefix
    from .processes.slots import SlotWriter

    ignore_sigint()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # a SIGTERM unwinds to `finally`: the segments get unlinked
    exit_with_parent(parent_pid)  # unwinds to `finally` too, whichever consumer thread started us
    if forked:
        one_torch_thread()  # the only torch setting that works in a forked process (lifetime.one_torch_thread)
    _adopt_random_states(states)
    writer = SlotWriter(prefix)
    free = _Credits(credits, depth, parent_pid)
    try:
        iterator = iter(source() if make else source)
        while (slot := free.take()) is not None:
            try:
                item = next(iterator)
            except StopIteration:
                send(items, Exhausted(), prefix)
                return
            send(items, ItemReady(slot, writer.write(slot, writer.space(slot, None, 0), item)), prefix)
    except SystemExit:
        raise  # sys.exit() in the iterable, or the consumer died: the process ends, as a worker's would
    except BaseException as exc:  # anything else the iterable raises keeps its type, KeyboardInterrupt too
        with contextlib.suppress(OSError):
            send(items, ItemFailed(Failure.capture(exc, "the background iterable")), prefix)
    finally:
        # The consumer unlinks the segments when it stops us; if it is gone, nobody else will.
        if os.getppid() != parent_pid:
            unlink_prefix(prefix)


# --- the consumer side --------------------------------------------------------------------

_SPAWN_INSTEAD = (
    'pass start_method="spawn" and a function that returns the iterable, e.g. '
    'background(lambda: make_items(), start_method="spawn"): the producer then starts without them'
)


class _Producer:
    """The consumer's handle on the producer process; stopping it is idempotent and also runs at exit."""

    def __init__(self, source: Any, make: bool, depth: int, start_method: str):
        import multiprocess

        from .lifetime import sigint_ignored
        from .processes.channel import Outbox, PipeReader
        from .processes.segments import claim_prefix, remove_stale_segments

        remove_stale_segments()  # left by consumers that were killed (their producers clean up too)

        context = multiprocess.get_context(start_method)
        if start_method == "fork":
            from .preflight import warn_threads_before_fork

            warn_threads_before_fork("the background process", _SPAWN_INSTEAD, stacklevel=3)  # the user's next()
        prefix_lock = claim_prefix()  # marks the segments as alive until _stop (see segments.PrefixLock)
        self.prefix = prefix_lock.prefix
        items_in, items_out = context.Pipe(duplex=False)
        credits_in, credits_out = context.Pipe(duplex=False)
        forked = start_method == "fork"
        self.process = context.Process(
            target=_produce,
            args=(source, make, depth, self.prefix, items_out, credits_in, os.getpid(), forked, _random_states()),
            name="prefetch-background",
            daemon=True,
        )
        try:
            with sigint_ignored():  # a Ctrl-C while a spawned producer boots is the consumer's alone
                self.process.start()
        finally:
            items_out.close()
            credits_in.close()
        self.inbox = PipeReader(items_in)  # owns items_in
        self.credits = Outbox(credits_out)  # writes through credits_out, which _stop closes
        self.poller = select.poll()
        self.poller.register(self.inbox.fileno(), select.POLLIN)
        self.poller.register(self.process.sentinel, select.POLLIN)
        self.watching_credits = False  # whether the poller waits for room in the credits pipe
        self.arrived: deque[Message] = deque()
        self.items = 0
        self._stop = weakref.finalize(self, _stop, self.process, self.credits, (items_in, credits_out), prefix_lock)

    def next_item(self, reader: SlotReader) -> tuple[bool, Any]:
        """``(True, item)``, or ``(False, None)`` once the iterable is exhausted."""
        from .processes.messages import Exhausted, ItemFailed, ItemReady, SlotFree, encode

        message = self._next_message()
        if isinstance(message, Exhausted):
            return False, None
        if isinstance(message, ItemFailed):
            raise message.failure.to_exception(self.items, (), self.process.pid)
        assert isinstance(message, ItemReady)
        item, _ = reader.read(message.slot, message.layout, lease=False)
        with contextlib.suppress(OSError):  # a producer that died meanwhile is noticed at the next wait
            self.credits.put(encode(SlotFree(message.slot)))
        self._watch_credits()
        self.items += 1
        return True, item

    def _next_message(self) -> Message:
        """The producer's next message, waiting for it; ``WorkerDiedError`` if it ended without one."""
        while not self.arrived:
            ready = {fd for fd, _ in self.poller.poll()}
            if self.credits.fileno() in ready:
                with contextlib.suppress(OSError):
                    self.credits.flush()
                self._watch_credits()
            if ready - {self.credits.fileno()}:
                try:
                    self.arrived.extend(self.inbox.read_available())
                except (EOFError, OSError):  # every writer is gone: the process is
                    raise self._died() from None
                if not self.arrived and self.process.sentinel in ready:  # it ended with nothing left to read
                    raise self._died()
        return self.arrived.popleft()

    def _watch_credits(self) -> None:
        """Have ``_next_message`` wake when the credits pipe has room, while frames wait for it."""
        if self.credits.pending != self.watching_credits:
            self.watching_credits = self.credits.pending
            if self.watching_credits:
                self.poller.register(self.credits.fileno(), select.POLLOUT)
            else:
                self.poller.unregister(self.credits.fileno())

    def _died(self) -> WorkerDiedError:
        from .lifetime import PRODUCER_JOIN_TIMEOUT_S

        self.process.join(PRODUCER_JOIN_TIMEOUT_S)
        return WorkerDiedError(
            f"the background process (pid {self.process.pid}) {describe_exit(self.process.exitcode)}, "
            f"while making item {self.items}",
            batch=self.items,
            pid=self.process.pid,
        )

    def stop(self) -> None:
        self._stop()


def _stop(process: Any, credits: Outbox, conns: tuple[Any, ...], prefix_lock: PrefixLock) -> None:
    """Tell the producer to stop, escalate to kill, then unlink every segment it made, and the lock."""
    from .lifetime import PRODUCER_JOIN_TIMEOUT_S, join_or_kill
    from .processes.messages import Stop, encode

    with contextlib.suppress(OSError, ValueError):
        credits.put(encode(Stop()))
    join_or_kill([process], PRODUCER_JOIN_TIMEOUT_S)
    credits.close()
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.close()
    prefix_lock.release()


def background(
    iterable: Iterable[Any] | Callable[[], Iterable[Any]], depth: int = 2, start_method: str | None = None
) -> Generator[Any, None, None]:
    """Run ``iterable`` (e.g. a plain generator) in one background process; yield its items in order.

    ``iterable`` is any iterable, or a zero-argument function returning one (needed
    where fork does not exist). At most ``depth`` items are made ahead. The result is
    a real generator (Keras ``fit`` accepts it); the process starts at its first
    ``next()`` and stops when it is exhausted, closed or dropped.

    ``start_method``: ``"fork"`` (the default where it exists) copies this process as it is,
    generator object included; ``"spawn"`` starts a fresh one, which receives the iterable -- a
    function that returns it, or a picklable iterable -- by pickling (dill), so that no lock another
    thread of yours holds at the start is copied into it.

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
    method = _start_method(start_method)
    if not make and method != "fork" and isinstance(iterable, Iterator):
        if start_method is None:
            raise ForkUnavailableError(
                "prefetch.background needs the fork start method to run a generator object (it cannot be "
                "pickled), and fork is not available here; pass a zero-argument function that returns the "
                "iterable instead, e.g. background(lambda: data_generator(32, x, y))"
            )
        raise TypeError(
            f"with start_method={start_method!r} the background process receives the iterable by pickling, and "
            f"a {type(iterable).__name__} cannot be pickled: pass a zero-argument function that returns the "
            f"iterable instead, e.g. background(lambda: data_generator(32, x, y), start_method={start_method!r})"
        )
    return _run(iterable, make, depth, method)


def _start_method(requested: str | None) -> str:
    """The producer's start method: ``requested``, or fork where it exists (else spawn).

    Not forkserver: a process the forkserver starts is its child, not the consumer's, and keeps the
    forkserver alive (it holds the descriptor whose closing ends it), so after a killed consumer the two
    would wait for each other (see ``docs/design.md``, *Shutdown*)."""
    if requested is None:
        return "fork" if _fork_available() else "spawn"
    if requested == "fork" and not _fork_available():
        raise ForkUnavailableError("start_method='fork' is not available here; pass 'spawn' and a function")
    if requested not in ("fork", "spawn"):
        raise ValueError(f"start_method must be 'fork', 'spawn' or None (fork where it exists); got {requested!r}")
    return requested


def _run(source: Any, make: bool, depth: int, start_method: str) -> Generator[Any, None, None]:
    producer: _Producer | None = None
    try:
        from .processes.slots import SlotReader

        producer = _Producer(source, make, depth, start_method)
        reader = SlotReader()
        while True:
            more, item = producer.next_item(reader)
            if not more:
                return
            yield item
    finally:
        if producer is not None:
            producer.stop()
