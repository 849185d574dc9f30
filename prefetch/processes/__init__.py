"""The ``processes`` executor: a coordinator process, forked workers, shared-memory slots.

Three roles, side by side, each over ``core``, the IPC wing (``ipc``) and this package's shared parts
(messages, sources), none importing another: the consumer's end
(``executor.ProcessExecutor``), the coordinator (``coordinator.coordinator_main``) and the
worker (``worker.worker_main``). ``process_executor`` puts them together.
"""

from __future__ import annotations

from .coordinator import coordinator_main
from .executor import ProcessExecutor
from .worker import worker_main


def process_executor() -> ProcessExecutor:
    """An executor whose coordinator runs ``coordinator_main`` and forks workers that run ``worker_main``."""
    return ProcessExecutor(coordinator_main, worker_main)
