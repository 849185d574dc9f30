"""A coordinator in a fresh interpreter (start method spawn or forkserver): what it is sent, and the
mistakes caught in the user's call instead of inside it.

What it is sent: the configuration, pickled once with dill (``pickle_config``), with the numpy
sources replaced by small handles first (``share_sources``: a memmap is reopened by path, any other
array copied once into a segment under the loader's prefix, ``ipc.handles``), which the coordinator
opens again (``resolve_sources``) before it forks its workers, who inherit them. Nothing is copied
per worker, and a segment lives only as long as its mappings.

What is caught first, with the fix:

* ``check_picklable`` (at construction): every option or source that will be pickled must pickle.
  Numpy sources are not pickled (they are shared through a segment), so they are not tested;
  everything else is pickled into a sink that stops after ``PICKLE_PROBE_BYTES``, so a large list
  source costs at most that much work.
* ``check_main_guarded`` (when the engine starts): the code that starts the loader must not run at
  the top level of the ``__main__`` script outside ``if __name__ == "__main__":``, or the child would
  run it again while it boots (multiprocessing's "bootstrapping phase" error).

See ``docs/design.md`` ("Processes and the data path", "Failures").
"""

from __future__ import annotations

import ast
import io
import os
import sys
from types import FrameType
from typing import Any

import numpy as np

from ..core.config import LoaderConfig
from ..errors import MainGuardError, ShmSpaceError
from ..ipc.handles import MemmapFile, SharedArray
from ..preflight import SOURCE_COPY_FIX

# How much of a pickled option or source the construction check writes before it trusts the
# rest: an unpicklable part usually fails at once (a generator, a connection, a lock), and the
# bound keeps the check cheap for large Python-object sources (they are pickled for real at start).
PICKLE_PROBE_BYTES = 64 * 1024
# A pickling error's text can be a page long (dill's trace for a sqlite3.Connection): keep its start.
REASON_MAX_CHARS = 200


# --- what it is sent ---------------------------------------------------------------------


def copy_purpose(position: int, source: np.ndarray) -> tuple[str, str]:
    """What the segment of source ``position`` holds, and the fix when it does not fit (``create_segment``)."""
    what = (
        f"the copy of the data set that start_method spawn/forkserver makes there: source {position}, "
        f"{source.nbytes / 2**20:.1f} MiB ({source.dtype} {source.shape})"
    )
    return what, SOURCE_COPY_FIX


def share_sources(sources: tuple[Any, ...], prefix: str) -> tuple[Any, ...]:
    """Replace numpy sources by small handles before the coordinator is spawned (others pickle as they are)."""
    shared: list[Any] = []
    for position, source in enumerate(sources):
        handle: Any = source
        if isinstance(source, np.memmap):
            handle = MemmapFile.of(source) or source
        if isinstance(handle, np.ndarray) and not handle.dtype.hasobject:
            try:
                handle = SharedArray.copy_of(handle, f"{prefix}source{position}", copy_purpose(position, handle))
            except OSError as exc:
                raise ShmSpaceError(exc.errno, exc.strerror) from exc
        shared.append(handle)
    return tuple(shared)


def resolve_sources(sources: tuple[Any, ...]) -> tuple[Any, ...]:
    """Turn handles back into read-only arrays (in the coordinator; its workers inherit them)."""
    return tuple(source.open() if isinstance(source, (SharedArray, MemmapFile)) else source for source in sources)


def pickle_config(config: LoaderConfig) -> bytes:
    """The configuration pickled for a coordinator that is spawned (not forked): with dill, so lambdas and
    closures travel. Arrays and dtypes inside it (a list of arrays as a source, an array in a closure) go
    through numpy's own protocol-5 reduction: dill's rebuilds an array of non-native byte order ('>i4')
    with the native one."""
    import dill

    class ConfigPickler(dill.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if type(obj) is np.ndarray or isinstance(obj, np.dtype):
                return obj.__reduce_ex__(5)
            return NotImplemented

    buffer = io.BytesIO()
    ConfigPickler(buffer, protocol=5).dump(config)
    return buffer.getvalue()


# --- what is caught first ------------------------------------------------------------------


class _ProbeFull(Exception):
    """Raised by the probe's sink once it has seen enough bytes."""


class _ProbeSink:
    """A file-like object that counts what is written and stops the pickler after ``limit`` bytes."""

    def __init__(self, limit: int):
        self.written = 0
        self.limit = limit

    def write(self, data: Any) -> int:
        size = len(data) if not isinstance(data, memoryview) else data.nbytes
        self.written += size
        if self.written > self.limit:
            raise _ProbeFull
        return size


def fresh_process_start_method(config: LoaderConfig) -> str | None:
    """The start method if the loader's coordinator starts in a fresh interpreter (spawn or
    forkserver), else None (``workers=0``, or fork)."""
    if config.workers == 0:
        return None
    method = config.start_method
    if method is None:
        import multiprocess  # only here: the platform's default decides

        method = multiprocess.get_context().get_start_method()
    return None if method == "fork" else method


def _pickled_parts(config: LoaderConfig) -> list[tuple[str, str, Any]]:
    """``(name, kind, value)`` for every part of the configuration a fresh coordinator gets by pickling."""
    parts: list[tuple[str, str, Any]] = []
    for name in ("transform", "batch_transform"):
        value = getattr(config, name)
        if value is not None:
            parts.append((name, "callable", value))
    if callable(config.collate):
        parts.append(("collate", "callable", config.collate))
    for position, source in enumerate(config.sources):
        if isinstance(source, np.ndarray) and not source.dtype.hasobject:
            continue  # shared through a segment, never pickled
        parts.append((f"source {position}", "source", source))
    return parts


def _why_not_picklable(value: Any) -> str | None:
    """None if ``value`` pickles (as far as the probe goes), else the pickler's complaint, shortened."""
    from multiprocess.reduction import ForkingPickler  # the pickler the spawned process is started with

    try:
        ForkingPickler(_ProbeSink(PICKLE_PROBE_BYTES)).dump(value)
    except _ProbeFull:
        return None
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        if len(reason) > REASON_MAX_CHARS:
            reason = reason[: REASON_MAX_CHARS - 3] + "..."
        return reason
    return None


def check_picklable(config: LoaderConfig) -> None:
    """Raise ``TypeError`` naming the first option or source that a spawn/forkserver coordinator
    could not receive, and what to change."""
    parts = _pickled_parts(config)
    if not parts:
        return
    method = fresh_process_start_method(config)
    if method is None:
        return
    for name, kind, value in parts:
        reason = _why_not_picklable(value)
        if reason is None:
            continue
        if kind == "callable":
            fix = "make it a top-level function, or an object whose attributes pickle (no open file, generator, lock)"
        else:
            fix = "open connections and files lazily in __getitem__ (drop them in __getstate__), or pass a numpy array"
        raise TypeError(
            f"{name} ({type(value).__name__}) cannot be pickled: {reason}. With start_method={method!r} the "
            f"coordinator is a new process that receives it by pickling: {fix}; or use start_method='fork'."
        ) from None


# --- the __main__ guard ------------------------------------------------------------------

_parsed: dict[tuple[str, float], ast.Module] = {}


def _parse(path: str) -> ast.Module | None:
    try:
        key = (path, os.path.getmtime(path))
        if key not in _parsed:
            with open(path, encoding="utf-8") as file:
                _parsed[key] = ast.parse(file.read(), path)
        return _parsed[key]
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return None


def _mentions_name(test: ast.expr) -> bool:
    return any(isinstance(node, ast.Name) and node.id == "__name__" for node in ast.walk(test))


def unguarded_main_line() -> tuple[str, int] | None:
    """``(script, line)`` if this call comes from the top level of the ``__main__`` script, from
    a line that no ``if __name__ ...:`` encloses; None otherwise (or when it cannot be told)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not isinstance(path, str) or not path.endswith(".py"):
        return None  # an interactive session, python -c, a notebook: nothing is imported again
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals is vars(main)):
        frame = frame.f_back
    if frame is None:
        return None  # e.g. started from another thread
    line = frame.f_lineno
    tree = _parse(path)
    if tree is None:
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _mentions_name(node.test):
            end = node.end_lineno or node.lineno
            if node.lineno <= line <= end:
                return None
    return path, line


def check_main_guarded(config: LoaderConfig) -> None:
    """Raise ``RuntimeError`` if a spawn/forkserver loader is started from unguarded top-level code
    of the ``__main__`` script (or from within such a process's start-up, which is the same mistake)."""
    method = fresh_process_start_method(config)
    if method is None:
        return
    import multiprocess

    booting = getattr(multiprocess.process.current_process(), "_inheriting", False)
    where = unguarded_main_line()
    if where is None and not booting:
        return
    script = f"{where[0]} (line {where[1]})" if where else "the __main__ script"
    raise MainGuardError(
        f"this loader uses start_method={method!r}: its coordinator is a new Python process that imports "
        f"your script {script} again, and the code that starts the loader is not under "
        '`if __name__ == "__main__":`, so the new process would start a loader of its own while it boots. '
        'Fix: put the script\'s entry code under `if __name__ == "__main__":` (e.g. `if __name__ == '
        '"__main__": main()`); or use start_method="fork".'
    )
