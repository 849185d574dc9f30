"""The errors prefetch raises, and how a worker's exception travels to the consumer.

Exceptions raised by *user code* (a source's ``__getitem__``, ``transform``,
``collate``, ``batch_transform``) are re-raised in the consumer with their own type,
the worker's formatted traceback chained as ``__cause__`` and a note that names the
batch, the sample index and the worker. Everything the engine itself reports is a
``PrefetchError``:

* ``LoaderClosedError`` -- the loader was used after ``close()``.
* ``LoaderExhaustedError`` -- ``iter(loader)`` or ``loader.stream()`` of a finite loader whose
  epochs are all consumed (also a ``RuntimeError``).
* ``WorkerError`` -- a batch could not be made in a worker; carries ``batch``,
  ``indices`` and ``pid``.

  * ``WorkerDiedError`` -- the worker process died (signal or exit code) while making it.
  * ``WorkerTimeoutError`` -- it took longer than ``timeout`` seconds (also a ``TimeoutError``).
  * ``RemoteError`` -- user code raised an exception that could not be rebuilt in the
    consumer (unpicklable); its type name, text and traceback are kept.

* ``ConcurrentIterationError`` -- a second thread iterated a loader while another did
  (also a ``RuntimeError``).
* ``IteratorSupersededError`` -- an older ``iter(loader)`` was resumed after a newer one of the
  same loader took over (also a ``RuntimeError``).
* ``CoordinatorDiedError`` -- the coordinator process died or failed.

  * ``CoordinatorTimeoutError`` -- with ``timeout``, the coordinator did not act on a late
    batch (it was stopped or stuck) and was killed (also a ``TimeoutError``).

    * ``StartTimeoutError`` -- with ``timeout``, the engine did not start within it (a coordinator
      forked from a multi-threaded process can deadlock) and was killed.

* ``WorkersKeepDyingError`` -- raised *in the coordinator* when freshly started workers keep
  dying before they make anything (also a ``RuntimeError``); the coordinator fails with it,
  so the consumer sees a ``CoordinatorDiedError`` whose text carries it.
* ``ForkUnavailableError`` -- ``background()`` was given a generator object where the fork
  start method does not exist (also a ``RuntimeError``).

* ``ShmSpaceError`` -- the pre-flight check found too little room in ``/dev/shm`` for the
  loader's batches (also an ``OSError``).
* ``ShardError`` -- a sharded reader (``TarShards``, ``ParquetRows``, ``NpyShards``) cannot read a
  shard as it indexed it: truncated, corrupt, not of its format, or changed since; carries ``path``,
  ``index`` and ``key``. Raised in a source's ``__getitem__``, it reaches the consumer as itself.

``PrefetchWarning`` is what the pre-flight check warns with (threads before fork, large
Python-object sources, a low open-files limit): see ``prefetch.doctor``.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
import warnings
from dataclasses import dataclass


class PrefetchError(Exception):
    """Base class of every error the engine raises itself."""


class LoaderClosedError(PrefetchError, RuntimeError):
    """Raised when a closed loader is iterated or asked for its state."""


class LoaderExhaustedError(PrefetchError, RuntimeError):
    """Raised by ``iter(loader)`` (and ``loader.stream()``) when a loader made with ``epochs=E`` has
    yielded all its epochs: a loop that asks for another epoch would otherwise get nothing, silently.
    The message says how many epochs were consumed and what to do."""


class ConcurrentIterationError(PrefetchError, RuntimeError):
    """Raised in a thread that iterates a loader while another thread iterates it: a loader is
    iterated by one thread at a time (the other thread's iteration goes on undisturbed)."""


class MainGuardError(PrefetchError, RuntimeError):
    """Raised when a loader that starts its processes by spawn or forkserver is started from the top
    level of the ``__main__`` script, outside ``if __name__ == "__main__":`` (the child would run the
    script again); the message says where to add the guard."""


class OutsideBatchError(PrefetchError, RuntimeError):
    """Raised by ``prefetch.batch_rng()`` called while no batch is being made (it exists only inside a
    transform, a collate function or a source's ``__getitem__``, run for a batch)."""


class IteratorSupersededError(PrefetchError, RuntimeError):
    """Raised by an ``iter(loader)`` generator resumed after a newer ``iter(loader)`` of the same
    loader took the engine over: only the newest iterates (it continues from ``loader.position``)."""


class CoordinatorDiedError(PrefetchError):
    """Raised when the coordinator process died or failed; the loader cannot go on."""


class CoordinatorTimeoutError(CoordinatorDiedError, TimeoutError):
    """Raised when, with ``timeout``, the coordinator did not act on a late batch in time (it was
    stopped or stuck); the consumer killed it and the loader cannot go on."""


class StartTimeoutError(CoordinatorTimeoutError):
    """Raised when, with ``timeout``, the engine had not started (its coordinator had not started its
    workers) ``timeout`` seconds after the first batch was asked for; the coordinator was killed. The
    message names the likely cause: a fork from a process with other threads running, or a slow
    start-up (unpickling the sources under spawn)."""


class WorkersKeepDyingError(PrefetchError, RuntimeError):
    """Raised in the coordinator when workers die one after another before doing any work (a broken
    environment, an OOM killer on a tight limit): it gives up rather than restart them forever.
    Not a ``WorkerDiedError``: no batch is to blame. It reaches the consumer inside the
    ``CoordinatorDiedError`` of the failed coordinator."""

    def __init__(self, message: str, *, pid: int | None = None, exitcode: int | None = None):
        super().__init__(message)
        self.pid = pid  # the last worker that died
        self.exitcode = exitcode  # and how it ended (a negative signal number, or an exit code)


class ForkUnavailableError(PrefetchError, RuntimeError):
    """Raised by ``background()`` when given a generator object (which cannot be pickled) where the
    fork start method does not exist; pass a zero-argument function that returns the iterable."""


class ShmSpaceError(PrefetchError, OSError):
    """Raised when a loader starts and ``/dev/shm`` cannot hold ``prefetch`` of its batches."""


class ShardError(PrefetchError):
    """Raised by a sharded reader when a shard cannot be read as its index says: truncated, corrupt, not of the
    reader's format, or changed (replaced, grown, truncated) since the index was built. ``path`` names the shard;
    ``index`` and ``key`` the sample being read (None while indexing, or where the format has no key)."""

    def __init__(self, message: str, *, path: str | None = None, index: int | None = None, key: str | None = None):
        super().__init__(message)
        self.path = path
        self.index = index
        self.key = key


class PrefetchWarning(UserWarning):
    """Warned by the pre-flight check when a loader starts: it will run, but something may go wrong."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str) -> None:
    """Warn with ``PrefetchWarning`` at the user's line: the first caller outside prefetch (a ``for``
    loop that started a loader, the call that made one), however deep inside prefetch the cause was found."""
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, PrefetchWarning, stacklevel=level)


class WorkerError(PrefetchError):
    """Raised when a batch could not be made in a worker process."""

    def __init__(self, message: str, *, batch: int, indices: tuple[int, ...] = (), pid: int | None = None):
        super().__init__(message)
        self.batch = batch
        self.indices = indices
        self.pid = pid


class WorkerDiedError(WorkerError):
    """Raised when the worker making a batch died (killed, crashed, exited) too often."""


class WorkerTimeoutError(WorkerError, TimeoutError):
    """Raised when one batch took longer than the loader's ``timeout`` in a worker."""


class RemoteError(WorkerError):
    """Raised for a user-code exception that could not be rebuilt in the consumer."""

    def __init__(
        self, message: str, *, type_name: str, batch: int, indices: tuple[int, ...] = (), pid: int | None = None
    ):
        super().__init__(message, batch=batch, indices=indices, pid=pid)
        self.type_name = type_name


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, chained as its ``__cause__``."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\n" + self.text


class BatchNote(Exception):
    """Python 3.10 only: the note naming the batch of an exception raised in the calling process
    (``workers=0``), chained as its ``__cause__`` (in front of its own cause) so that the printed
    traceback shows it; 3.11 and later print the note itself."""


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)``. Python 3.10 has no ``add_note`` and prints no ``__notes__`` (unless a backport such
    as ``exceptiongroup``, which pytest imports, taught ``traceback`` to): there the note is kept in ``__notes__``
    all the same and, when ``traceback`` would not print it, also written where the printed traceback shows it --
    at the end of the chained worker's ``RemoteTraceback``, else in a ``BatchNote`` chained in front of the
    exception's own cause."""
    if sys.version_info >= (3, 11):
        exc.add_note(note)
        return
    exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]
    if _notes_printed():
        return
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        cause.text = f"{cause.text.rstrip()}\n{note}"
        cause.args = (cause.text,)
        return
    shown = BatchNote(note)
    shown.__cause__ = cause
    exc.__cause__ = shown


def _notes_printed() -> bool:
    """Whether ``traceback`` prints ``__notes__`` here (3.10: only once a backport patched it)."""
    probe = Exception()
    probe.__notes__ = ["probe"]  # type: ignore[attr-defined]
    return "probe" in "".join(traceback.format_exception_only(type(probe), probe))


@dataclass(frozen=True, slots=True)
class Failure:
    """A user-code exception packed in a worker, small enough for a message."""

    type_name: str
    text: str
    traceback: str
    pickled: bytes | None  # the exception itself, when it survives a dill round trip
    where: str  # e.g. "transform of sample 17"

    @classmethod
    def capture(cls, exc: BaseException, where: str) -> Failure:
        """Pack ``exc`` (being handled now) for the trip to the consumer."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        import dill  # lazily: it is only needed when something went wrong

        pickled: bytes | None
        try:
            pickled = dill.dumps(exc)
            dill.loads(pickled)  # a class that pickles but cannot be rebuilt is no use to the consumer
        except Exception:
            pickled = None
        return cls(type(exc).__qualname__, safe_text(exc), tb, pickled, where)

    def to_exception(self, batch: int, indices: tuple[int, ...], pid: int | None) -> BaseException:
        """The exception the consumer raises: the original type, or ``RemoteError``."""
        worker = f"worker pid {pid}" if pid is not None else "the calling process (workers=0)"
        note = f"prefetch: raised in {where_text(self.where)} of batch {batch}, in {worker}"
        exc: BaseException | None = None
        if self.pickled is not None:
            import dill

            try:
                exc = dill.loads(self.pickled)
            except Exception:
                exc = None
        if not isinstance(exc, BaseException):
            exc = RemoteError(
                f"{self.type_name}: {self.text} (the exception could not be rebuilt here; its traceback follows)",
                type_name=self.type_name,
                batch=batch,
                indices=indices,
                pid=pid,
            )
        exc.__cause__ = RemoteTraceback(self.traceback)
        add_note(exc, note)
        return exc


def safe_text(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder when the exception's own ``__str__`` raises: the user's
    exception must still reach the consumer as itself, never as the error of its ``__str__``."""
    try:
        return str(exc)
    except Exception as problem:
        return f"<{type(exc).__qualname__}.__str__ raised {type(problem).__qualname__}>"


def where_text(where: str) -> str:
    return where or "user code"


def annotate(exc: BaseException, where: str, batch: int) -> BaseException:
    """Add the in-process (``workers=0``) note that matches a worker's."""
    add_note(exc, f"prefetch: raised in {where_text(where)} of batch {batch}, in the calling process (workers=0)")
    return exc


def describe_exit(exitcode: int | None) -> str:
    """Say how a process ended, with the likely cause: 'killed by SIGKILL (...)' or 'exited with code 3'."""
    if exitcode is None:
        return "is still running"
    if exitcode >= 0:
        return (
            f"exited with code {exitcode}: something in it called sys.exit() or os._exit() "
            "(user code, or a library giving up)"
        )
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    hints = {
        "SIGKILL": "killed by SIGKILL: the kernel's OOM killer is the usual cause (check `dmesg`); "
        "lower `prefetch`, the batch size or the number of workers",
        "SIGSEGV": "crashed with SIGSEGV: a segmentation fault, usually in a C extension used by the "
        "transform or the source",
        "SIGBUS": "crashed with SIGBUS: often /dev/shm is full (Docker: raise --shm-size)",
    }
    return hints.get(name, f"killed by {name}")
