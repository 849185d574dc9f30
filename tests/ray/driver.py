"""A minimal engine over an ``Executor``: what ``consumer.Engine`` does, just enough to test the Ray
executor through the protocol until the engine lands on main (then the tests use ``Loader``).

It keeps the reorder buffer, yields by batch number, raises a ``Failed`` batch's error when it is
reached, runs the ``timeout`` clock (``late(b)`` at the deadline, once the executor has started),
and stops the executor when it is closed or exhausted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prefetch._lifecycle import WakePipe
from prefetch.config import LoaderConfig, make_config
from prefetch.executor import Executor, Failed, Made
from prefetch.ray_executor import order_of


class Driver:
    """Iterate ``executor``'s batches of ``config`` in order, from batch ``start``."""

    def __init__(self, config: LoaderConfig, executor: Executor, start: int = 0):
        self.config = config
        self.executor = executor
        self.position = start
        self.total = order_of(config).num_batches
        self.ready: dict[int, Made | Failed] = {}
        self.max_ready = 0  # the most results the reorder buffer held at once
        self.makers: dict[int, int] = {}  # batch -> pid of the worker that made it
        self.wake = WakePipe()
        executor.start(config, start, self.wake)

    def next_batch(self) -> Any:
        batch = self.position
        self.executor.advance(batch)
        deadline = None
        while batch not in self.ready:
            if deadline is None and self.config.timeout is not None and self.executor.started:
                deadline = time.monotonic() + self.config.timeout
            for result in self.executor.wait(0.5):
                if result.batch >= self.position and result.batch not in self.ready:
                    self.ready[result.batch] = result
                elif isinstance(result, Made):
                    self.executor.drop(result)
            self.max_ready = max(self.max_ready, len(self.ready))
            if deadline is not None and time.monotonic() >= deadline and batch not in self.ready:
                self.executor.late(batch)
                deadline = float("inf")  # the executor answers with a Failed
        result = self.ready.pop(batch)
        self.position += 1
        if isinstance(result, Failed):
            raise result.error
        self.makers[batch] = result.worker
        return self.executor.open(result)

    def __iter__(self) -> Iterator[Any]:
        try:
            while self.total is None or self.position < self.total:
                yield self.next_batch()
        finally:
            self.close()

    def close(self) -> None:
        for result in self.ready.values():
            if isinstance(result, Made):
                self.executor.drop(result)
        self.ready.clear()
        self.executor.stop()
        self.wake.close()


def config(*sources: Any, **options: Any) -> LoaderConfig:
    """A loader configuration as ``Loader`` would make it."""
    return make_config(sources, **options)


def take(driver: Driver, count: int | None = None) -> list[Any]:
    """``count`` batches (None: to the end), then close the driver."""
    out = []
    try:
        for batch in driver:
            out.append(batch)
            if count is not None and len(out) == count:
                break
    finally:
        driver.close()
    return out
