"""The IPC wing: what any part of prefetch that runs in several processes stands on.

It knows pipes, files in ``/dev/shm``, mapped memory and processes -- never loaders, batches or
executors: the ``processes`` executor and ``background`` both stand on it, side by side, each with
its own messages (``processes/messages.py``, ``background.py``).

* ``channel``   frames on a pipe: atomic writes, spill files, ``Outbox`` (writes that never block),
                ``PipeReader``, ``WakePipe``
* ``segments``  files in ``/dev/shm``: naming, the owner's prefix lock, the stale sweep, spill files
* ``slots``     a nested value of arrays in a numbered slot: written in place, read without a copy
* ``handles``   arrays that travel as small handles: a copy in a segment, a memmap reopened by path
* ``lifetime``  how a process lives and ends: die with the parent, signals, scheduling, thread limits,
                ``join_or_kill``, pidfds

See ``docs/design.md`` ("The layout", "Messages", "Shared memory: slots and leases", "Shutdown").
"""
