"""The ``processes`` executor: a coordinator process, forked workers, shared-memory slots.

::

    consumer (ProcessRun)            coordinator                         workers (forked by it)
      |--- control: Consumed, Lost, TimedOut, Stop -->|
      |                                               |--- tasks: Task, Stop (one pipe each) --->|
      |<------------ results (one pipe): BatchReady, BatchFailure --------------------------------|
      |<------------ results: CoordinatorReady, WorkerLost, GiveUp, CoordinatorCrashed, WorkersStopped
      views each batch in its slot (/dev/shm)                         write each batch into a slot

* ``ProcessExecutor`` (here), the template: ``start`` checks the script and the machine
  (``spawn.check_main_guarded``, ``preflight``) and wires the three roles into one run: the run is
  handed the coordinator's entry point, and hands the coordinator the worker's (``launch.Roles``);
* ``run.ProcessRun``, the consumer's end: results in, credits and slots back, the coordinator watched;
* ``launch.CoordinatorProcess``: the coordinator process as the consumer sees it (started, known, ended);
* ``coordinator``: runs the ``Schedule``, dispatches tasks, supervises and replaces workers;
* ``worker``: the worker prologue, then one ``make_numbered_batch`` per task, into its slot;
* ``messages``: the protocol; ``spawn``: what a coordinator in a fresh interpreter is sent and checked for.

The roles never import each other (``tests/unit/test_design_rules.py``), and are imported when a
loader starts: ``import prefetch`` pulls in no multiprocess. See ``docs/design.md`` ("Processes and
the data path", "Messages", "Shutdown").
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
