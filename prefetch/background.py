"""``background``: run an existing sequential generator in one background process, ahead of the loop.

The smallest step from a plain generator: nothing in it changes, it just runs in another process
while the training loop works on the previous items::

    gen = prefetch.background(data_generator(32, x_train, y_train), depth=2)
    model.fit(gen, steps_per_epoch=len(x_train) // 32, epochs=10)

It stands on the IPC wing beside the ``processes`` executor, with a protocol of its own (below):
frames on two pipes (``ipc.channel``), items in slots under an owner's prefix (``ipc.slots``,
``ipc.segments``), a producer that lives and ends by ``ipc.lifetime``. What it guarantees:

* at most ``depth`` items are made ahead: the producer takes a free slot *before* ``next`` runs, so
  memory stays bounded however slow the loop is; items come in the iterable's order;
* an item's arrays cross in a slot and are copied out of it (one ``memcpy``): an item the user holds
  never changes; an exception in the iterable is raised in the consumer with its own type and the
  producer's traceback as ``__cause__``;
* neither process ever waits for the other to read (an ``Outbox`` on the consumer's side);
* the producer continues from the consumer's ``random``, ``np.random`` and torch CPU generator states
  (``core.rng.global_states``); a forked one runs torch with one thread (``lifetime.one_torch_thread``);
* nothing is left: closing, exhausting or dropping the generator, an exception or interpreter exit
  stop the producer (``Stop``, then ``join_or_kill``) and unlink its segments; a producer whose
  consumer died exits by itself (``exit_with_parent``) and unlinks them.

See ``docs/design.md`` ("background"). Use ``Loader`` when one process is not enough: it runs many
workers, deterministically, and yields arrays without any copy.
"""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import signal
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, NamedTuple

from .core.rng import adopt_global_states, global_states
from .errors import Failure, ForkUnavailableError, WorkerDiedError, describe_exit
from .ipc.channel import Outbox, PipeReader, encode, send
from .ipc.ending import join_or_kill
from .ipc.lifetime import (
    PARENT_CHECK_INTERVAL_S,
    exit_with_parent,
    ignore_sigint,
    one_torch_thread,
    sigint_ignored,
    warn_threads_before_fork,
)
from .ipc.segments import PrefixLock, claim_prefix, remove_stale_segments, unlink_prefix
from .ipc.slots import SlotLayout, SlotReader, SlotWriter

__all__ = ["background"]

# --- the protocol: two one-way pipes ---------------------------------------------------------------
#
#   items    producer -> consumer    ItemReady, Exhausted, ItemFailure
#   control  consumer -> producer    SlotFree, Stop


class ItemReady(NamedTuple):
    """Producer -> consumer: the iterable's next item is in ``slot``, laid out as ``layout`` says."""

    slot: int
    layout: SlotLayout


class Exhausted(NamedTuple):
    """Producer -> consumer: the iterable has no more items."""


class ItemFailure(NamedTuple):
    """Producer -> consumer: the iterable raised; ``failure`` packs the exception."""

    failure: Failure


class SlotFree(NamedTuple):
    """Consumer -> producer: ``slot`` was read (copied out) and may be written again."""

    slot: int


class Stop(NamedTuple):
    """Consumer -> producer: stop between two items."""


# How long the producer told to stop may take: it notices ``Stop`` only between items, so it is given
# time to finish the one its iterable is making.
PRODUCER_JOIN_TIMEOUT_S = 2.0
# What a slot holds, and the fix when /dev/shm cannot hold one.
SLOT_PURPOSE = ("an item of prefetch.background", "free space there, or lower depth (Docker: --shm-size)")

# --- the producer process -----------------------------------------------------------------


def _fork_available() -> bool:
    import multiprocess  # lazily: `import prefetch` does not import multiprocess

    return "fork" in multiprocess.get_all_start_methods()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the iterable to _produce's cleanup


class _FreeSlots:
    """The producer's free slots: ``depth`` at first, and one more with each ``SlotFree``."""

    def __init__(self, conn: Any, depth: int, parent_pid: int):
        self.inbox = PipeReader(conn)
        self.poller = select.poll()
        self.poller.register(self.inbox.fileno(), select.POLLIN)
        self.free = list(range(depth))
        self.parent_pid = parent_pid
        self.stopped = False  # told to stop, or the consumer is gone

    def take(self) -> int | None:
        """A free slot, waiting for one while there is none; None once the producer is to stop."""
        self._read()  # every time: a Stop is seen between items, and slots never pile up in the pipe
        while not self.free and not self.stopped:
            if self.poller.poll(round(PARENT_CHECK_INTERVAL_S * 1000)):
                self._read()
            elif os.getppid() != self.parent_pid:
                self.stopped = True  # orphaned: the consumer died
        return None if self.stopped else self.free.pop()

    def _read(self) -> None:
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
    control: Any,
    parent_pid: int,
    forked: bool,
    states: tuple[Any, Any, bytes | None],
) -> None:
    """The producer's life: take a free slot, make the next item into it, send it; until told to stop."""
    ignore_sigint()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # a SIGTERM unwinds to `finally`: the segments get unlinked
    exit_with_parent(parent_pid)  # unwinds to `finally` too, whichever consumer thread started us
    if forked:
        one_torch_thread()  # the only torch setting that works in a forked process (lifetime.one_torch_thread)
    adopt_global_states(states)
    writer = SlotWriter(prefix, SLOT_PURPOSE)
    free = _FreeSlots(control, depth, parent_pid)
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
            send(items, ItemFailure(Failure.capture(exc, "the background iterable")), prefix)
    finally:
        # The consumer unlinks the segments when it stops us; if it is gone, nobody else will.
        if os.getppid() != parent_pid:
            unlink_prefix(prefix)


# --- the consumer side --------------------------------------------------------------------

_SPAWN_INSTEAD = (
    'pass start_method="spawn" and a function that returns the iterable, e.g. '
    'background(lambda: make_items(), start_method="spawn"): the producer then starts without them'
)
_ITEMS, _ENDED = "items", "producer ended"  # what a selector key's data says (the control pipe's: its Outbox)


class _Producer:
    """The consumer's handle on the producer process; stopping it is idempotent and also runs at exit."""

    def __init__(self, source: Any, make: bool, depth: int, start_method: str):
        import multiprocess  # lazily: `import prefetch` does not import multiprocess

        remove_stale_segments()  # left by consumers that were killed (their producers clean up too)
        context = multiprocess.get_context(start_method)
        forked = start_method == "fork"
        if forked:
            warn_threads_before_fork("the background process", _SPAWN_INSTEAD)
        prefix_lock = claim_prefix()  # marks the segments as alive until _stop (see segments.PrefixLock)
        self.prefix = prefix_lock.prefix
        items_in, items_out = context.Pipe(duplex=False)
        control_in, control_out = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_produce,
            args=(source, make, depth, self.prefix, items_out, control_in, os.getpid(), forked, global_states()),
            name="prefetch-background",
            daemon=True,
        )
        try:
            with sigint_ignored():  # a Ctrl-C while a spawned producer boots is the consumer's alone
                self.process.start()
        finally:
            items_out.close()
            control_in.close()
        self.inbox = PipeReader(items_in)  # owns items_in
        self.selector = selectors.DefaultSelector()
        self.control = Outbox(control_out, selector=self.selector)  # writes through control_out, closed by _stop
        self.selector.register(self.inbox.fileno(), selectors.EVENT_READ, _ITEMS)
        self.selector.register(self.process.sentinel, selectors.EVENT_READ, _ENDED)
        self.arrived: deque[Any] = deque()
        self.items = 0
        conns = (items_in, control_out)
        self._stop = weakref.finalize(self, _stop, self.process, self.control, self.selector, conns, prefix_lock)

    def next_item(self, reader: SlotReader) -> tuple[bool, Any]:
        """``(True, item)``, or ``(False, None)`` once the iterable is exhausted."""
        message = self._next_message()
        if isinstance(message, Exhausted):
            return False, None
        if isinstance(message, ItemFailure):
            raise message.failure.to_exception(self.items, (), self.process.pid)
        assert isinstance(message, ItemReady)
        item, _ = reader.read(message.slot, message.layout, lease=False)
        with contextlib.suppress(OSError):  # a producer that died meanwhile is noticed at the next wait
            self.control.put(encode(SlotFree(message.slot)))
        self.items += 1
        return True, item

    def _next_message(self) -> Any:
        """The producer's next message, waiting for it; ``WorkerDiedError`` if it ended without one."""
        while not self.arrived:
            readable = ended = False
            for key, _ in self.selector.select():
                if key.data is self.control:
                    with contextlib.suppress(OSError):
                        self.control.flush()
                else:
                    readable, ended = True, ended or key.data is _ENDED
            if readable:
                try:
                    self.arrived.extend(self.inbox.read_available())
                except (EOFError, OSError):  # every writer is gone: the process is
                    raise self._died() from None
                if not self.arrived and ended:  # it ended with nothing left to read
                    raise self._died()
        return self.arrived.popleft()

    def _died(self) -> WorkerDiedError:
        self.process.join(PRODUCER_JOIN_TIMEOUT_S)
        return WorkerDiedError(
            f"the background process (pid {self.process.pid}) {describe_exit(self.process.exitcode)}, "
            f"while making item {self.items}",
            batch=self.items,
            pid=self.process.pid,
        )

    def stop(self) -> None:
        self._stop()


def _stop(
    process: Any, control: Outbox, selector: selectors.BaseSelector, conns: tuple[Any, ...], prefix_lock: PrefixLock
) -> None:
    """Tell the producer to stop, escalate to kill, then unlink every segment it made, and the lock."""
    with contextlib.suppress(OSError, ValueError):
        control.put(encode(Stop()))
    join_or_kill([process], PRODUCER_JOIN_TIMEOUT_S)
    control.close()
    selector.close()
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
