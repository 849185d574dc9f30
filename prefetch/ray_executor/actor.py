"""The Ray actor of ``executor="ray"``: ``BatchMaker``, one worker of the loader on a Ray cluster.

It keeps the executor contract as every worker does: the ``ipc.lifetime.worker_prologue`` once, then
each batch by ``core.pipeline.make_numbered_batch`` (seeded for its number), user code's exceptions
answered as a packed ``Failure``. Its sources arrive packed (``transfer``). Nothing here imports Ray
at module level: ``RayRun`` wraps ``BatchMaker`` with ``ray.remote`` when a loader starts, so
``import prefetch`` never pulls Ray in. See ``docs/design.md`` ("The Ray executor").
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from typing import Any

import numpy as np

from ..core.config import LoaderConfig
from ..core.pipeline import Timings, UserCodeRaised, make_numbered_batch
from ..errors import Failure
from ..ipc.lifetime import wake_on_time, worker_prologue
from .transfer import portable, unpack_sources


class BatchMaker:
    """One Ray actor: makes batches by number with the same pipeline as a worker process.

    Ray runs an actor's calls one at a time in the order they were submitted, so the batches
    queued on an actor are made in order; the executor relies on it to tell which batch an
    actor was making when it died.
    """

    def __init__(self, config: LoaderConfig, *arrays: Any):
        worker_prologue(config.worker_nice, config.limit_threads, ignore_interrupts=False)
        self.config = replace(config, sources=unpack_sources(config.sources, arrays))
        self.pid = os.getpid()
        self.tight_thread: int | None = None  # the thread whose timer slack is set (see ``make``)

    def hello(self) -> tuple[int, str, str]:
        """``(pid, node id, node address)``: who this actor is, for ``Stats`` and failures."""
        import ray

        context = ray.get_runtime_context()
        return self.pid, context.get_node_id(), ray.util.get_node_ip_address()

    def make(self, batch: int, packed: bytes) -> tuple[Any, Timings] | Failure:
        """Batch ``batch`` of the samples ``packed`` (int64 indices): the collated batch (``portable``) and
        its timings, or the ``Failure`` of the user code that raised."""
        indices = np.frombuffer(packed, dtype=np.int64)
        if self.tight_thread != threading.get_ident():
            # A timed wait in a transform wakes on time: per thread, so set where the calls run (Ray's
            # main thread here, not necessarily the one the prologue ran in).
            self.tight_thread = threading.get_ident()
            wake_on_time()
        try:
            made, timings = make_numbered_batch(self.config, batch, indices)
        except UserCodeRaised as error:
            return error.failure
        return portable(made), timings
