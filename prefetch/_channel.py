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

# multiprocess's Connection prefixes 4 bytes of length and writes header and body at
# once for bodies up to 16 KiB, so a body up to PIPE_BUF - 4 bytes is one atomic write.
ATOMIC_MESSAGE_MAX_BYTES = getattr(select, "PIPE_BUF", 512) - 4

_spills = count()


def send(conn: Any, message: Message, prefix: str) -> None:
    """Write ``message`` to ``conn`` in one atomic write, spilling it to a file if it is too large."""
    data = encode(message)
    if len(data) > ATOMIC_MESSAGE_MAX_BYTES:
        name = f"{prefix}spill-{os.getpid()}-{next(_spills)}"
        data = encode(Spilled(write_file_segment(name, data)))
    conn.send_bytes(data)


def receive(conn: Any) -> Message:
    """Read one message (raises ``BlockingIOError`` on a non-blocking pipe with nothing to read)."""
    message = decode(conn.recv_bytes())
    if isinstance(message, Spilled):
        message = decode(read_file_segment(message.segment))
    return message
