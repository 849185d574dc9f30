"""Messages on pipes: atomic sends on the shared results pipe, and writes that never block.

POSIX guarantees that a ``write`` of at most ``PIPE_BUF`` bytes to a pipe is not
interleaved with other writers' data, so workers and the coordinator can share the
results pipe without a lock (a lock held by a worker that dies would block everyone).
A message larger than that -- a long traceback, a batch with very many arrays -- is
written to a file in the shm directory, and a small ``Spilled`` note goes on the pipe
instead; the reader unlinks the file.

The consumer and the coordinator write through an ``Outbox``: a non-blocking pipe end
and a queue of what the pipe could not take yet, flushed when the event loop sees the
pipe writable. No process of the engine ever waits for another to read (a peer that is
stopped, stuck in user code or dead would otherwise stop it serving everything else).
"""

from __future__ import annotations

import os
import select
import time
from collections import deque
from itertools import count
from typing import Any

from .messages import Message, Spilled, decode, encode
from .segments import read_file_segment, write_file_segment

# A frame is 4 bytes of length and the body, written at once, so a body up to
# PIPE_BUF - 4 bytes is one atomic write.
ATOMIC_MESSAGE_MAX_BYTES = getattr(select, "PIPE_BUF", 512) - 4

_spills = count()


def write_frame(conn: Any, data: bytes) -> None:
    """Write one frame (4-byte big-endian length, then ``data``) with as few ``write`` calls as
    the pipe allows: one, atomic, for a frame of at most ``PIPE_BUF`` bytes. The framing is
    ``Connection.send_bytes``'s, without its layers of Python calls on the hot path."""
    frame = memoryview(len(data).to_bytes(4, "big") + data)
    fd = conn.fileno()
    while frame:
        frame = frame[os.write(fd, frame) :]


def atomic_body(message: Message, prefix: str) -> bytes:
    """``message`` encoded for the shared results pipe: small enough for one atomic write, or,
    if it is not, stored in a file (named from ``prefix``) and replaced by a ``Spilled`` note."""
    data = encode(message)
    if len(data) > ATOMIC_MESSAGE_MAX_BYTES:
        name = f"{prefix}spill-{os.getpid()}-{next(_spills)}"
        data = encode(Spilled(write_file_segment(name, data)))
    return data


def send(conn: Any, message: Message, prefix: str) -> None:
    """Write ``message`` to ``conn`` in one atomic write, spilling it to a file if it is too large."""
    write_frame(conn, atomic_body(message, prefix))


class Outbox:
    """One process's non-blocking writes to one pipe: what the pipe cannot take now waits here.

    ``put`` writes at once what fits (one ``write``, as a blocking send would) and queues the
    rest; the owner's event loop waits for ``fileno()`` to be writable while ``pending`` and
    then calls ``flush``. Frames go out whole and in order. A reader that is gone shows up as
    ``BrokenPipeError`` from ``put`` or ``flush``.

    ``private=True`` is for a pipe other processes write too (the results pipe): ``O_NONBLOCK``
    belongs to the open file description, which forked processes share, and the workers write
    through the shared one with ordinary blocking writes. The pipe is reopened through
    ``/proc/self/fd`` to get a description of this process's own. There, a frame of at most
    ``PIPE_BUF`` bytes is written whole or not at all, so messages still never interleave.
    Without ``/proc`` the writes stay blocking (the engine's behaviour before outboxes).
    """

    def __init__(self, conn: Any, *, private: bool = False):
        fd = conn.fileno()
        self._owned_fd = False
        if private:
            try:
                fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self._owned_fd = True
            except OSError:  # pragma: no cover - no /proc: blocking writes, as before
                pass
        else:
            os.set_blocking(fd, False)
        self._fd = fd
        self._frames: deque[memoryview] = deque()
        self._head_started = False  # part of the first queued frame is already in the pipe

    def fileno(self) -> int:
        return self._fd

    @property
    def pending(self) -> bool:
        """Whether frames wait for room in the pipe."""
        return bool(self._frames)

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

    def flush(self) -> bool:
        """Write queued frames until the pipe is full; True once nothing is left."""
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
        """Close the descriptor this outbox opened itself (a private one); queued frames are dropped."""
        self._frames.clear()
        if self._owned_fd:
            self._owned_fd = False
            os.close(self._fd)


def _unspill(message: Message) -> Message:
    if isinstance(message, Spilled):
        return decode(read_file_segment(message.segment))
    return message


class PipeReader:
    """Reads the messages of a pipe's read end: every message one ``read`` returns.

    The pipe is made non-blocking; ``read_available`` never blocks (wait on ``fileno()``
    first) and decodes as many whole messages as have arrived -- one system call for a
    burst of messages instead of two per message. Messages are ``write_frame``
    frames: a 4-byte big-endian length, then the pickled message.
    """

    _CHUNK_BYTES = 1 << 16  # a whole pipe buffer in one read

    def __init__(self, conn: Any):
        self._conn = conn  # owns the descriptor
        self._fd = conn.fileno()
        os.set_blocking(self._fd, False)
        self._buffer = bytearray()

    def fileno(self) -> int:
        return int(self._fd)

    def read_available(self) -> list[Message]:
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
