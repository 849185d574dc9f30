"""Loading a batch's samples with ``io_threads`` threads: the pool, and ``GlobalDraws``.

Only the loading -- ``source[i]``, the I/O -- runs in threads (``readahead.Loads``); the transform,
collate and ``batch_transform`` stay in the calling thread, sample after sample, so the draws they make
from the generators seeded for the batch (``rng``) come in the same order for any ``io_threads``. The
samples keep their batch order. A source's ``__getitem__`` that draws random numbers would draw in thread
order, so the pipeline looks at the generators before and after a threaded load (``GlobalDraws``) and
fails the batch if one moved. See ``docs/design.md`` ("io_threads").

One pool per process and thread count, made at first use and dropped in a forked child (a pool's
threads do not survive a fork): a worker makes its own and keeps it for its life. In the calling
process (``workers=0``) the engine ends them when it closes (``end_pools``), so that no idle thread of
ours is running when a later loader forks its coordinator.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from . import rng

_pools: dict[tuple[str, int], ThreadPoolExecutor] = {}


def _forget_pools() -> None:
    _pools.clear()  # the parent's threads are not in the child: its pools would never run a task


os.register_at_fork(after_in_child=_forget_pools)


def pool(threads: int, name: str = "prefetch-io") -> ThreadPoolExecutor:
    """This process's pool ``name`` of ``threads`` threads (made at first use; ``prefetch-hedge``: the hedged
    reads' spare pool, ``readahead``)."""
    found = _pools.get((name, threads))
    if found is None:
        found = _pools[name, threads] = ThreadPoolExecutor(threads, thread_name_prefix=name)
    return found


def replace_pool(threads: int, name: str = "prefetch-io") -> None:
    """Make the next ``pool(threads, name)`` a new one: one of this pool's threads is held by a read whose copy
    was dropped (``readahead``), which may never end. The tasks queued on it still run, on its other threads."""
    found = _pools.pop((name, threads), None)
    if found is not None:
        found.shutdown(wait=False)


def end_pools(wait: bool = True) -> None:
    """End this process's pools, after the loads in flight unless ``wait`` is False (a later load makes a new
    pool)."""
    while _pools:
        _pools.popitem()[1].shutdown(wait=wait)


def _numpy_state() -> tuple[bytes, int]:
    state: Any = np.random.get_state()  # ("MT19937", key, position, ...)
    return state[1].tobytes(), state[2]


def _torch_state() -> bytes | None:
    generator = rng.torch_generator()
    return generator.get_state().numpy().tobytes() if generator is not None else None


class GlobalDraws:
    """Whether the batch's generators moved between ``__init__`` and ``check()``: one look at each per
    batch (a few microseconds), only where loads run in threads (``io_threads > 1``, ``hedge=True``)."""

    def __init__(self) -> None:
        self.python = random.getstate()
        self.numpy = _numpy_state()
        self.torch = _torch_state()
        self.batch_rng = rng.current_generator()

    def check(self, loaded_by: str = "io_threads > 1", fix: str = "io_threads=1") -> None:
        """Raise ``RuntimeError`` naming the first generator that moved (and what threaded the load, and the fix)."""
        moved = (
            "random" if random.getstate() != self.python
            else "np.random" if _numpy_state() != self.numpy
            else "torch's generator" if _torch_state() != self.torch
            else "prefetch.batch_rng()" if rng.current_generator() is not self.batch_rng
            else None
        )  # fmt: skip
        if moved is not None:
            raise RuntimeError(
                f"a source's __getitem__ drew from {moved} while {loaded_by} loaded the batch: the threads draw "
                "in no fixed order, so the batch would not be a function of its number. Draw in transform (it runs "
                f"sample after sample, in the batch's order), or use {fix}"
            )
