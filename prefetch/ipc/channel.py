"""Frames on pipes: atomic writes on a shared pipe, spill files, writes that never block, wake-ups.

Invariants this module keeps (``docs/design.md``, "Messages" and "Who writes to whom"):

* a frame is a 4-byte big-endian length and a pickled message, written in one ``write``; a frame of
  at most ``PIPE_BUF`` bytes is atomic, so many writers share one pipe without a lock (a lock held by
  a process that dies would block everyone) and a writer killed mid-send leaves no half message;
* a message too large for that goes to a spill file (``segments``) and a small ``Spilled`` pointer
  is sent instead; the reader reads and unlinks the file;
* an ``Outbox`` never blocks its process: what the pipe cannot take waits in its queue, and while
  anything waits it has its event loop's selector wake the loop when the pipe has room -- the one
  place that watch is kept;
* ``WakePipe`` lets any thread wake a thread that waits in a selector.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import selectors
import threading
import time
from collections import deque
from itertools import count
from typing import Any, NamedTuple

from .segments import SegmentRef, read_file_segment, write_file_segment

# A frame is 4 bytes of length and the body, written at once, so a body up to
# PIPE_BUF - 4 bytes is one atomic write.
ATOMIC_MESSAGE_MAX_BYTES = getattr(select, "PIPE_BUF", 512) - 4

_spills = count()


class Spilled(NamedTuple):
    """Any writer -> a reader: a message too large for one atomic write, stored in a file."""

    segment: SegmentRef


def encode(message: Any) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> Any:
    return pickle.loads(data)


def write_frame(conn: Any, data: bytes) -> None:
    """Write one frame (4-byte big-endian length, then ``data``) with as few ``write`` calls as
    the pipe allows: one, atomic, for a frame of at most ``PIPE_BUF`` bytes. The framing is
    ``Connection.send_bytes``'s, without its layers of Python calls on the hot path."""
    frame = memoryview(len(data).to_bytes(4, "big") + data)
    fd = conn.fileno()
    while frame:
        frame = frame[os.write(fd, frame) :]


def atomic_body(message: Any, prefix: str) -> bytes:
    """``message`` encoded for a shared pipe: small enough for one atomic write, or, if it is not,
    stored in a file (named from ``prefix``) and replaced by a ``Spilled`` note."""
    data = encode(message)
    if len(data) > ATOMIC_MESSAGE_MAX_BYTES:
        name = f"{prefix}spill-{os.getpid()}-{next(_spills)}"
        data = encode(Spilled(write_file_segment(name, data)))
    return data


def send(conn: Any, message: Any, prefix: str) -> None:
    """Write ``message`` to ``conn`` in one atomic write, spilling it to a file if it is too large."""
    write_frame(conn, atomic_body(message, prefix))


class Outbox:
    """One process's non-blocking writes to one pipe: what the pipe cannot take now waits here.

    ``put`` writes at once what fits (one ``write``, as a blocking send would) and queues the
    rest. Given its event loop's ``selector``, the outbox registers its descriptor there for
    ``EVENT_WRITE`` (with itself as the key's data) exactly while frames wait, so the loop wakes
    when the pipe has room and calls ``flush``. Frames go out whole and in order. A reader that is
    gone shows up as ``BrokenPipeError`` from ``put`` or ``flush``.

    ``private=True`` is for a pipe other processes write too (a shared results pipe): ``O_NONBLOCK``
    belongs to the open file description, which forked processes share, and they write through the
    shared one with ordinary blocking writes. The pipe is reopened through ``/proc/self/fd`` to get a
    description of this process's own. There, a frame of at most ``PIPE_BUF`` bytes is written whole
    or not at all, so messages still never interleave. Without ``/proc`` the writes stay blocking.
    """

    def __init__(self, conn: Any, *, private: bool = False, selector: selectors.BaseSelector | None = None):
        fd = conn.fileno()
        self._owned_fd = False
        if private:
            try:
                fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self._owned_fd = True
            except OSError:  # pragma: no cover - no /proc: blocking writes
                pass
        else:
            os.set_blocking(fd, False)
        self._fd = fd
        self._frames: deque[memoryview] = deque()
        self._head_started = False  # part of the first queued frame is already in the pipe
        self._selector = selector
        self._watched = False  # registered for EVENT_WRITE in the selector

    def fileno(self) -> int:
        return self._fd

    @property
    def pending(self) -> bool:
        """Whether frames wait for room in the pipe."""
        return bool(self._frames)

    def _watch(self) -> None:
        """Keep the selector watching for room exactly while frames wait."""
        if self._selector is not None and self._watched != self.pending:
            self._watched = self.pending
            if self._watched:
                self._selector.register(self._fd, selectors.EVENT_WRITE, self)
            else:
                self._selector.unregister(self._fd)

    def put(self, body: bytes) -> None:
        """Send one frame (4-byte length, then ``body``) now, or as soon as the pipe has room."""
        frame = memoryview(len(body).to_bytes(4, "big") + body)
        if self._frames:
            self._frames.append(frame)
            self.flush()
            return
        try:
            written = os.write(self._fd, frame)
        except BlockingIOError:
            written = 0
        if written < len(frame):
            self._frames.append(frame[written:])
            self._head_started = written > 0
            self._watch()

    def flush(self) -> bool:
        """Write queued frames until the pipe is full; True once nothing is left."""
        try:
            return self._write_queued()
        finally:
            self._watch()

    def _write_queued(self) -> bool:
        frames = self._frames
        while frames:
            try:
                written = os.write(self._fd, frames[0])
            except BlockingIOError:
                return False
            if written < len(frames[0]):
                frames[0] = frames[0][written:]
                self._head_started = True
                return False
            frames.popleft()
            self._head_started = False
        return True

    def drop_queued(self) -> int:
        """Forget the frames not yet begun (a frame already half in the pipe is finished first); return
        how many: the last ones ``put``, which never reached the reader."""
        dropped = 0
        while len(self._frames) > (1 if self._head_started else 0):
            self._frames.pop()
            dropped += 1
        self._watch()
        return dropped

    def flush_within(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the pipe to take every queued frame (for a last word before exit)."""
        deadline = time.monotonic() + seconds
        while not self.flush():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([], [self._fd], [], left)
        return True

    def close(self) -> None:
        """Drop the queued frames, leave the selector, and close the descriptor if this outbox opened
        it (a private one)."""
        self._frames.clear()
        if self._watched and self._selector is not None:
            self._watched = False
            with contextlib.suppress(KeyError, ValueError, OSError):  # the selector may be closed already
                self._selector.unregister(self._fd)
        if self._owned_fd:
            self._owned_fd = False
            os.close(self._fd)


def _unspill(message: Any) -> Any:
    if isinstance(message, Spilled):
        return decode(read_file_segment(message.segment))
    return message


class PipeReader:
    """Reads the messages of a pipe's read end: every message one ``read`` returns.

    The pipe is made non-blocking; ``read_available`` never blocks (wait on ``fileno()``
    first) and decodes as many whole messages as have arrived -- one system call for a
    burst of messages instead of two per message. Messages are ``write_frame`` frames.
    """

    _CHUNK_BYTES = 1 << 16  # a whole pipe buffer in one read

    def __init__(self, conn: Any):
        self._conn = conn  # owns the descriptor
        self._fd = conn.fileno()
        os.set_blocking(self._fd, False)
        self._buffer = bytearray()

    def fileno(self) -> int:
        return int(self._fd)

    def read_available(self) -> list[Any]:
        """The messages that have arrived, in order; ``EOFError`` once every writer is gone."""
        try:
            chunk = os.read(self._fd, self._CHUNK_BYTES)
        except BlockingIOError:
            return []
        if not chunk:
            raise EOFError("every writer of the pipe is gone")
        buffer = self._buffer
        buffer += chunk
        messages, start = [], 0
        while len(buffer) - start >= 4:
            size = int.from_bytes(buffer[start : start + 4], "big")
            if len(buffer) - start - 4 < size:
                break
            messages.append(_unspill(decode(bytes(buffer[start + 4 : start + 4 + size]))))
            start += 4 + size
        del buffer[:start]
        return messages


class WakePipe:
    """A pipe that any thread writes to wake a thread waiting on ``fileno()`` in a selector.

    ``wake`` sets ``woken`` first, so the waiting thread can tell why it woke. Once ``close``d it
    writes nothing (the descriptor numbers may belong to something else by then).
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()
        self._closed = False
        self.woken = False

    def fileno(self) -> int:
        return self._read

    def wake(self) -> None:
        with self._lock:
            self.woken = True
            if self._closed:
                return
            try:
                os.write(self._write, b"!")
            except OSError:  # woken already: the pipe is full
                pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read)
                os.close(self._write)
