"""What to make next: the credit window, the place budget, redoing lost batches.

``Schedule`` is plain state with no process, pipe or clock in it, so every rule of
backpressure and recovery can be tested on its own. An executor asks it for the next
task (``next_task``), tells it what the consumer took and gave back (``consumed``), and
what a lost worker left undone (``lost``); it answers with batch numbers and place numbers. A
*place* is where a batch is kept from dispatch until the consumer gives it back: a shared-memory
slot in the ``processes`` executor (place ``p`` is slot ``p``), an in-flight token in Ray's.
The ``processes`` executor runs it in the coordinator; the ``ray`` executor in the consumer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import NamedTuple

from ..errors import WorkerDiedError, WorkerError, WorkerTimeoutError
from .order import Order


class Why(Enum):
    """Why a batch is given up on."""

    DIED = "died"  # its worker died, and it has killed more workers than ``retries`` allows
    LATE = "late"  # the consumer waited longer than ``timeout`` for it and its worker was stopped


class GiveUp(NamedTuple):
    """A batch given up on: it will not be made (again). The schedule decides it (``batch``, ``why``,
    ``attempts``), the executor adds the worker that had it (``pid``, ``who``) and how that worker
    ended (``how``), and the consumer raises ``error()``: the one record of a give-up in every executor
    (the ``processes`` coordinator sends it on the results pipe), and the one place its text is made."""

    batch: int
    why: Why
    attempts: int = 0  # workers that died making it
    pid: int | None = None  # the worker that had it; None when no worker had it
    who: str = ""  # that worker in words: "worker pid 12", "Ray actor pid 12 on node ..."
    how: str = ""  # how it ended (``Why.DIED``): "killed by SIGKILL: ...", a Ray error's first line

    def error(self, indices: Sequence[int], timeout: float | None, retries: int) -> WorkerError:
        """The error the user gets at this batch (``indices``: its sample indices)."""
        shown, batch = list(indices), self.batch
        if self.why is Why.LATE:
            head = f"batch {batch} (sample indices {shown}) was not ready within timeout={timeout}s"
            tail = f"; {self.who}, which had it, was killed" if self.who else ", and no worker was making it"
            text = head + tail
            return WorkerTimeoutError(text, batch=batch, indices=tuple(shown), pid=self.pid)
        text = (
            f"{self.who} {self.how}, while making batch {batch} (sample indices {shown}); "
            f"it killed {self.attempts} worker(s), retries={retries}"
        )
        return WorkerDiedError(text, batch=batch, indices=tuple(shown), pid=self.pid)


class Schedule:
    """The dispatch state of one engine, from batch ``start`` on.

    Batch ``b`` is dispatched only while ``b < position + prefetch`` (the credit window), and
    only with a place to put it in. The pool grows lazily to ``prefetch`` places plus one per
    batch the user holds, never beyond ``max_places`` (``LoaderConfig.max_slots``).
    """

    def __init__(self, order: Order, start: int, prefetch: int, max_places: int, retries: int):
        self.order = order  # batch number -> sample indices
        self.total = order.num_batches  # batches in the stream; None when endless
        self.prefetch = prefetch  # the window: batches ready or in flight beyond ``position``
        self.max_places = max_places  # the pool's ceiling, whatever the user holds
        self.retries = retries  # times a batch may be redone after its worker died
        self.position = start  # batches the consumer has taken: everything below is done with
        self.next_batch = start  # the first batch never dispatched
        self.redo: deque[int] = deque()  # lost batches to make again, before any new one
        self.attempts: dict[int, int] = {}  # batch -> workers that died making it
        self.late: set[int] = set()  # batches whose worker was stopped for ``timeout``
        self.free_places: list[int] = []  # places with nothing in them
        self.place_count = 0  # places made so far, numbered 0 .. place_count - 1
        self.held = 0  # batches the user holds, as last reported (each keeps its place)

    def _next_batch(self) -> int | None:
        if self.redo:
            return self.redo[0]
        in_window = self.next_batch < self.position + self.prefetch
        if in_window and (self.total is None or self.next_batch < self.total):
            return self.next_batch
        return None

    def _take_place(self) -> int | None:
        if self.free_places:
            return self.free_places.pop()
        if self.place_count < min(self.max_places, self.prefetch + self.held):
            self.place_count += 1
            return self.place_count - 1
        return None

    def next_task(self) -> tuple[int, int] | None:
        """The next ``(batch, place)`` to dispatch, or None: the window is full, no place is free, or
        the stream is done. Lost batches come first."""
        batch = self._next_batch()
        if batch is None:
            return None
        place = self._take_place()
        if place is None:
            return None
        if self.redo:
            self.redo.popleft()
        else:
            self.next_batch += 1
        return batch, place

    def spare_place(self) -> int | None:
        """A place for a second copy of a batch in flight (a hedge): a free one, or a new one up to
        ``max_places`` (beyond the window's ``prefetch + held``, within the memory bound); None if none.
        It comes back like any other, when the consumer drops the copy it does not deliver."""
        if self.free_places:
            return self.free_places.pop()
        if self.place_count < self.max_places:
            self.place_count += 1
            return self.place_count - 1
        return None

    def consumed(self, position: int, released: Iterable[int], held: int) -> bool:
        """The consumer took every batch below ``position``, gave ``released`` places back and holds
        ``held`` batches. True when the position moved (done batches can be forgotten)."""
        self.held = held
        self.free_places.extend(released)
        if position <= self.position:
            return False
        self.position = position
        for batch in [b for b in self.attempts if b < position]:
            del self.attempts[batch]
        return True

    def lost(self, tasks: Sequence[tuple[int, int]], sure: bool = True) -> GiveUp | None:
        """A worker died; ``tasks`` are its ``(batch, place)`` the consumer never received, in the order
        it made them. Their places are free again; all are redone, except the first -- the one it was
        making -- when it was stopped for ``timeout`` or has now killed more than ``retries`` workers:
        then it is given up on, and returned. ``sure=False``: the first may have been made already (its
        answer lost with the worker), so the death counts against it but never gives it up: it is
        redone (alone, by an executor that can tell, see ``suspect``) until a death of its own does."""
        self.free_places.extend(place for _, place in tasks)
        if not tasks:
            return None
        head, rest = tasks[0][0], [batch for batch, _ in tasks[1:]]
        verdict = None
        if head in self.late:
            self.late.discard(head)
            verdict = GiveUp(head, Why.LATE, self.attempts.get(head, 0))
        else:
            self.attempts[head] = self.attempts.get(head, 0) + 1
            if self.attempts[head] > self.retries and sure:
                verdict = GiveUp(head, Why.DIED, self.attempts[head])
            else:
                self.redo.append(head)
        self.redo.extend(rest)
        return verdict

    def suspect(self, batch: int) -> bool:
        """``batch`` was in the front of a worker that died: it is made alone until it is answered, so
        that a death while making it is surely its own (``lost(..., sure=True)``)."""
        return batch in self.attempts

    def peek(self) -> int | None:
        """The batch ``next_task`` would dispatch (a place permitting), or None."""
        return self._next_batch()

    def requeue(self, tasks: Sequence[tuple[int, int]], given_up: int) -> None:
        """A worker killed because ``given_up`` was late (and answered as such already) is gone; ``tasks``
        are its ``(batch, place)`` the consumer never received. Their places are free again; every one
        but ``given_up`` is redone, none counted against: the worker died of the kill, not of them
        (if ``given_up`` had arrived after all, the batch it was making is simply made again)."""
        self.free_places.extend(place for _, place in tasks)
        self.redo.extend(batch for batch, _ in tasks if batch != given_up)

    def mark_late(self, batch: int) -> None:
        """The consumer gave up waiting for ``batch``; its worker is being stopped (see ``lost``)."""
        self.late.add(batch)

    def cancel(self, batch: int) -> None:
        """``batch`` is answered otherwise (no worker had it when it was late): do not redo it."""
        if batch in self.redo:
            self.redo.remove(batch)
