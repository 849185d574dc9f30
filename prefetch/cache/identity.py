"""What a cache directory was made for: a fingerprint of the sources and of ``load``, kept in its manifest.

``prepare`` runs before a directory is read (in the loader, at construction, and in any process that
finds the manifest missing): under an exclusive ``flock`` on ``<dir>/lock`` it compares the manifest
with this loader's fingerprint and, when they differ or there is none, removes every entry and writes
the new manifest -- a directory is rebuilt, never read stale. What the fingerprint can and cannot tell
apart is listed in ``docs/api.md`` ("Decode once"); in short:

* a source: its type, its length, and for a numpy array its shape, dtype and a hash of the bytes of its
  first, middle and last samples; for an ``np.memmap`` also its file's path, size and modification time;
  for any other source a hash of the pickled first, middle and last samples;
* ``load``: for a function, its module, name, compiled code (constants and names included), defaults and
  the values its closure holds; a ``functools.partial``'s function and arguments; any other callable, its
  class's and its own pickled state. Functions that ``load`` calls by name, and the libraries it uses, are
  not part of it.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import marshal
import os
import pickle
import sys
import types
from typing import Any

import numpy as np

from .store import FileStore

MANIFEST = "manifest.json"
LOCK = "lock"
# Bumped when what an entry holds, or how the fingerprint is made, changes: older directories are rebuilt.
FORMAT = 1


def fingerprint(sources: tuple[Any, ...], load: Any) -> dict[str, Any]:
    """The manifest of a cache of ``load`` over ``sources`` (JSON-ready)."""
    return {
        "format": FORMAT,
        "python": sys.version_info[:2],  # compiled code differs between versions
        "sources": [_source_identity(source) for source in sources],
        "load": _digest(_callable_identity(load, depth=0)) if load is not None else None,
    }


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _samples(source: Any) -> list[Any]:
    n = len(source)
    return [source[i] for i in sorted({0, n // 2, n - 1})] if n else []


def _source_identity(source: Any) -> dict[str, Any]:
    kind = type(source)
    found: dict[str, Any] = {"type": f"{kind.__module__}.{kind.__qualname__}", "len": len(source)}
    if isinstance(source, np.ndarray):
        found["shape"], found["dtype"] = list(source.shape), source.dtype.str
        if isinstance(source, np.memmap) and source.filename is not None:
            stat = os.stat(source.filename)
            found["file"] = [os.path.abspath(source.filename), stat.st_size, stat.st_mtime_ns, source.offset]
        if not source.dtype.hasobject:
            found["samples"] = _digest(b"".join(np.ascontiguousarray(s).tobytes() for s in _samples(source)))
            return found
    found["samples"] = _digest(_pickled(_samples(source)))
    return found


def _pickled(value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=4)
    except Exception:
        import dill  # closures, lambdas

        return bytes(dill.dumps(value, protocol=4))


def _callable_identity(value: Any, depth: int) -> bytes:
    """Bytes that change when the behaviour of ``value`` (``load``) visibly does (the module docstring)."""
    if depth > 4:  # closures of closures: deep enough
        return b""
    if isinstance(value, functools.partial):
        return b"partial" + _callable_identity(value.func, depth + 1) + _pickled((value.args, value.keywords))
    if isinstance(value, types.MethodType):
        return b"method" + _callable_identity(value.__func__, depth + 1) + _value_identity(value.__self__, depth)
    if isinstance(value, types.FunctionType):
        parts = [f"{value.__module__}.{value.__qualname__}".encode(), _code_identity(value.__code__)]
        parts.append(_pickled((value.__defaults__, value.__kwdefaults__)))
        for cell in value.__closure__ or ():
            parts.append(_value_identity(cell.cell_contents, depth + 1))
        return b"function" + b"|".join(parts)
    kind = type(value)
    return f"object {kind.__module__}.{kind.__qualname__}".encode() + _value_identity(value, depth)


def _value_identity(value: Any, depth: int) -> bytes:
    if isinstance(value, (types.FunctionType, functools.partial, types.MethodType)):
        return _callable_identity(value, depth + 1)
    if isinstance(value, types.ModuleType):
        return value.__name__.encode()
    try:
        return _pickled(value)
    except Exception:
        return repr(type(value)).encode()


def _code_identity(code: types.CodeType) -> bytes:
    """The compiled code without its file name and line numbers (moving a function does not rebuild)."""
    return marshal.dumps(code.replace(co_filename="", co_firstlineno=1, co_linetable=b""))


def prepare(store: FileStore, manifest: dict[str, Any], tidy: bool) -> bool:
    """Make ``store``'s directory one for ``manifest``: use it if its manifest is the same, else remove its
    entries and write ``manifest``. Returns True if it was rebuilt (or new). ``tidy`` (the loader, before
    any worker runs) also removes the writes in progress that killed processes left."""
    os.makedirs(store.directory, exist_ok=True)
    wanted = json.dumps(manifest, sort_keys=True)
    fd = os.open(os.path.join(store.directory, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = os.path.join(store.directory, MANIFEST)
        try:
            with open(path) as file:
                found = file.read()
        except FileNotFoundError:
            found = None
        if found == wanted:
            if tidy:
                store.remove_unfinished()
            return False
        if found is not None:
            os.unlink(path)  # first: a rebuild cut short leaves no manifest, hence no reads
        store.clear()
        temporary = f"{path}.{os.getpid()}"
        with open(temporary, "w") as file:
            file.write(wanted)
        os.rename(temporary, path)
        return True
    finally:
        os.close(fd)
