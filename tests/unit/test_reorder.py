"""``core.reorder``: results in completion order come out in batch order; leases give places back."""

from __future__ import annotations

import gc
from typing import NamedTuple

import numpy as np

from prefetch.core.reorder import Leases, ReorderBuffer


class Result(NamedTuple):
    batch: int


def test_batches_come_out_by_number_whatever_order_they_arrive_in():
    buffer: ReorderBuffer[Result] = ReorderBuffer(5)
    taken = []
    for batch in [7, 5, 8, 6, 9]:
        assert buffer.put(Result(batch))
        while buffer.ready():
            taken.append(buffer.take().batch)
    assert taken == [5, 6, 7, 8, 9] and buffer.position == 10 and len(buffer) == 0


def test_duplicates_and_batches_already_taken_are_refused():
    buffer: ReorderBuffer[Result] = ReorderBuffer(0)
    assert buffer.put(Result(1)) and not buffer.put(Result(1))
    buffer.put(Result(0))
    buffer.take()
    assert not buffer.put(Result(0))


def test_a_lease_gives_its_place_back_when_the_last_view_is_dropped():
    leases = Leases()
    base = np.zeros(8)
    view = base[2:]
    leases.add(base, 3, "segment")
    del base
    gc.collect()
    assert len(leases) == 1 and not leases.released  # a view still holds it
    del view
    gc.collect()
    assert len(leases) == 0 and list(leases.released) == [(3, "segment")]
