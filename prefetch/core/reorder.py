"""Results in completion order -> batches in batch order, and the leases on batches the user holds.

``ReorderBuffer`` keeps what arrived early until its turn: the consumer takes batch ``position``
and nothing else, so the stream is the same whatever order the workers finish in. ``Leases``
is the one owner of the places the consumer gives back: a weak reference with a callback on each
held batch's lease object gives its place (a shared-memory slot) back exactly when the user has
dropped every array of it, and a place nothing leases is given back at once. See ``docs/design.md``
("Shared memory: slots and leases", "Backpressure").
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import Any, Generic, Protocol, TypeVar


class _Numbered(Protocol):
    @property
    def batch(self) -> int: ...


R = TypeVar("R", bound=_Numbered)


class ReorderBuffer(Generic[R]):
    """Results keyed by batch number, from ``position`` on; late duplicates are refused."""

    def __init__(self, position: int):
        self.position = position  # the batch the consumer takes next
        self.waiting: dict[int, R] = {}

    def put(self, result: R) -> bool:
        """Keep ``result`` for its turn; False for a batch already taken or already here (a redone
        batch whose first copy arrived after all)."""
        if result.batch < self.position or result.batch in self.waiting:
            return False
        self.waiting[result.batch] = result
        return True

    def ready(self) -> bool:
        """Whether the next batch is here."""
        return self.position in self.waiting

    def take(self) -> R:
        """The next batch's result (it must be ``ready``); the position moves on."""
        result = self.waiting.pop(self.position)
        self.position += 1
        return result

    def __len__(self) -> int:
        return len(self.waiting)

    def clear(self) -> None:
        self.waiting.clear()


class Leases:
    """The places whose batch the user still holds, and those given back since last asked: the one
    owner of both. A place comes back when the user drops the last array of its batch (a weak
    reference's callback on the batch's lease object, in whatever thread drops it) or at once
    (``give_back``: a batch copied out, dropped, or failed); ``given_back`` hands them over.
    Every step is a single dict or deque operation, atomic under the GIL.
    """

    def __init__(self) -> None:
        self.held: dict[int, tuple[weakref.ref[Any], int, Any]] = {}
        self.released: deque[tuple[int, Any]] = deque()  # (place, note), in the order they came back

    def add(self, lease: Any, place: int, note: Any) -> None:
        """Watch ``lease``; when it is gone, ``(place, note)`` goes to ``released``."""
        ref = weakref.ref(lease, self._dropped)
        self.held[id(ref)] = (ref, place, note)

    def give_back(self, place: int, note: Any = None) -> None:
        """``place`` is free now: nothing of it is leased."""
        self.released.append((place, note))

    def given_back(self) -> list[tuple[int, Any]]:
        """Every ``(place, note)`` given back since the last call, oldest first."""
        released = self.released
        return [released.popleft() for _ in range(len(released))]

    def _dropped(self, ref: weakref.ref[Any]) -> None:
        entry = self.held.pop(id(ref), None)
        if entry is not None:
            self.released.append((entry[1], entry[2]))

    def __len__(self) -> int:
        return len(self.held)
