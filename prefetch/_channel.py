"""Sending messages on a pipe that has many writers: one atomic write each.

POSIX guarantees that a ``write`` of at most ``PIPE_BUF`` bytes to a pipe is not
interleaved with other writers' data, so workers and the coordinator can share the
results pipe without a lock (a lock held by a worker that dies would block everyone).
A message larger than that -- a long traceback, a batch with very many arrays -- is
written to a file in the shm directory, and a small ``Spilled`` note goes on the pipe
instead; the reader unlinks the file.
"""

from __future__ import annotations

import os
import select
from itertools import count
from typing import Any

from ._protocol import Message, Spilled, decode, encode
from ._shm import read_file_segment, write_file_segment

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


def send(conn: Any, message: Message, prefix: str) -> None:
    """Write ``message`` to ``conn`` in one atomic write, spilling it to a file if it is too large."""
    data = encode(message)
    if len(data) > ATOMIC_MESSAGE_MAX_BYTES:
        name = f"{prefix}spill-{os.getpid()}-{next(_spills)}"
        data = encode(Spilled(write_file_segment(name, data)))
    write_frame(conn, data)


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
