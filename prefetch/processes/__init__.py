"""The ``processes`` executor: a coordinator process, forked workers, shared-memory slots.

``ProcessExecutor`` is the template; each ``start`` checks this machine and the script
(``preflight``, the spawn checks) and makes one ``run.ProcessRun``. Three roles, side by side, each
over ``core``, the IPC wing (``ipc``) and this package's shared parts (``messages``, ``sources``),
none importing another: the consumer's end (``run.ProcessRun``), the coordinator
(``coordinator.coordinator_main``) and the worker (``worker.worker_main``). ``start`` wires them:
the run is handed the coordinator's entry point, and hands the coordinator the worker's. They are
imported when a loader starts: ``import prefetch`` pulls in no multiprocess.
See ``docs/design.md`` ("Processes and the data path").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.config import LoaderConfig
    from ..executor import Wake
    from .run import ProcessRun


class ProcessExecutor:
    """Batches made by worker processes under a coordinator: ``executor="processes"``, the default."""

    def start(self, config: LoaderConfig, start: int, wake: Wake) -> ProcessRun:
        from ..preflight import preflight
        from .coordinator import coordinator_main
        from .launch import Roles
        from .run import ProcessRun
        from .spawn import check_main_guarded
        from .worker import worker_main

        check_main_guarded(config)  # spawn/forkserver from an unguarded script: say so, start nothing
        preflight(config)  # fails fast on a full /dev/shm; warns about threads before fork, ...
        return ProcessRun(config, start, wake, Roles(coordinator_main, worker_main))
