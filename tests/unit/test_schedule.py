"""The dispatch rules, without any process: ``core.schedule.Schedule``.

Each test drives a ``Schedule`` the way an executor does (take tasks, report what the consumer
took and gave back, report a lost worker) and checks what it answers.
"""

from __future__ import annotations

import pytest

from prefetch.core.order import Order
from prefetch.core.schedule import GiveUp, Schedule, Why


def make(start: int = 0, prefetch: int = 4, max_places: int = 9, retries: int = 1, epochs: int | None = None):
    order = Order(n=40, batch_size=4, seed=0, shuffle=True, epochs=epochs, last_batch="wrap", rank=0, world_size=1)
    return Schedule(order, start, prefetch, max_places, retries)


def drain(schedule: Schedule) -> list[tuple[int, int]]:
    tasks = []
    while (task := schedule.next_task()) is not None:
        tasks.append(task)
    return tasks


def test_the_window_holds_prefetch_batches_and_moves_with_the_consumer():
    schedule = make(start=3, prefetch=4)
    assert [batch for batch, _ in drain(schedule)] == [3, 4, 5, 6]
    assert schedule.consumed(5, released=[0, 1], held=0)
    assert [batch for batch, _ in drain(schedule)] == [7, 8]


def test_slots_grow_lazily_to_the_window_plus_what_the_user_holds_and_never_past_the_ceiling():
    schedule = make(prefetch=3, max_places=5)
    assert sorted(slot for _, slot in drain(schedule)) == [0, 1, 2]
    schedule.consumed(3, released=[], held=3)  # the user holds all three batches
    assert sorted(slot for _, slot in drain(schedule)) == [3, 4]  # two new slots: the ceiling
    assert schedule.place_count == 5
    schedule.consumed(3, released=[1], held=2)
    assert drain(schedule) == [(5, 1)]  # a released slot is used again, no new one made


def test_a_finite_stream_ends():
    schedule = make(prefetch=100, max_places=300, epochs=1)
    assert [batch for batch, _ in drain(schedule)] == list(range(10))


def test_a_lost_workers_batches_are_redone_first_and_in_its_order():
    schedule = make(prefetch=4)
    tasks = drain(schedule)  # batches 0..3
    assert schedule.lost([tasks[1], tasks[2]]) is None
    assert schedule.attempts == {1: 1}  # only the batch it was making counts against it
    schedule.consumed(1, released=[tasks[0][1]], held=0)
    redone = drain(schedule)
    assert [batch for batch, _ in redone] == [1, 2, 4]
    assert {slot for _, slot in redone} <= {tasks[1][1], tasks[2][1], tasks[0][1]}


def test_a_batch_that_kills_more_than_retries_workers_is_given_up():
    schedule = make(retries=1)
    first = drain(schedule)[0]
    assert schedule.lost([first]) is None  # one death: redone
    again = drain(schedule)
    assert again[0][0] == 0
    assert schedule.lost([again[0]]) == GiveUp(0, Why.DIED, 2)
    assert 0 not in [batch for batch, _ in drain(schedule)]


def test_a_death_that_may_not_be_its_own_never_gives_a_batch_up_and_marks_it_suspect():
    # Ray: the answer of a call that ended just before its actor was killed dies with it, so the front
    # of the dead actor's calls may have been made already (sure=False when others were behind it).
    schedule = make(retries=1)
    tasks = drain(schedule)
    assert not schedule.suspect(0)
    assert schedule.lost(tasks[:2], sure=False) is None
    assert schedule.suspect(0) and not schedule.suspect(1)
    again = drain(schedule)
    assert schedule.lost(again[:2], sure=False) is None  # past retries, but maybe not its own: redone
    assert schedule.attempts == {0: 2} and schedule.peek() == 0
    alone = drain(schedule)[0]
    assert alone[0] == 0
    assert schedule.lost([alone], sure=True) == GiveUp(0, Why.DIED, 3)  # a death of its own decides


def test_a_late_batch_is_given_up_once_its_worker_is_gone_and_its_followers_are_redone():
    schedule = make()
    tasks = drain(schedule)
    schedule.mark_late(0)
    assert schedule.lost(tasks[:2]) == GiveUp(0, Why.LATE, 0)
    assert [batch for batch, _ in drain(schedule)] == [1]


def test_cancel_drops_a_batch_from_the_redo_queue():
    schedule = make()
    tasks = drain(schedule)
    schedule.lost(tasks[:2])
    schedule.cancel(0)
    assert list(schedule.redo) == [1]


def test_attempts_are_forgotten_once_the_consumer_is_past_the_batch():
    schedule = make()
    tasks = drain(schedule)
    schedule.lost(tasks[:1])
    assert schedule.attempts == {0: 1}
    schedule.consumed(1, released=[], held=0)
    assert schedule.attempts == {}


def test_a_report_that_does_not_move_the_position_still_frees_slots():
    schedule = make(prefetch=2, max_places=2)
    drain(schedule)
    assert not schedule.consumed(0, released=[0], held=0)
    assert schedule.free_places == [0]


@pytest.mark.parametrize("held", [0, 1, 5])
def test_while_the_consumer_waits_a_slot_is_always_available(held):
    """The budget argument of docs/design.md, on the pure state: with the next batch undispatched and
    every slot free or held, the schedule can always place it."""
    schedule = make(prefetch=3, max_places=2 * 3 + 1 + 1)
    schedule.consumed(0, released=[], held=held)
    assert schedule.next_task() is not None


def test_a_hedge_gets_a_spare_place_beyond_the_window_within_the_ceiling():
    schedule = make(prefetch=3, max_places=5)
    window = {slot for _, slot in drain(schedule)}
    assert window == {0, 1, 2}
    spares = [schedule.spare_place(), schedule.spare_place()]
    assert spares == [3, 4]  # beyond the full window, up to max_places
    assert schedule.spare_place() is None  # the ceiling holds
    schedule.consumed(0, released=[4], held=0)  # the copy not delivered gave its place back
    assert schedule.spare_place() == 4
