"""A worker SIGKILLed while it writes a cache entry leaves nothing torn: the entry is not there, the batch is
redone, the sample is loaded again, and the stream is the same bytes as without a cache."""

from __future__ import annotations

import os
import select
import signal
import threading

import pytest
from cachehelpers import CountingLoad, KilledMidWrite, N, calls, stream_digest

from prefetch.ipc.segments import SHM_DIR

HOOKED = 21  # in batch 5 of the unshuffled order: the loader is well under way when it is written


def _killer(read_end: int, seen: dict) -> None:
    """Wait for the hooked worker's report, look at what is on disk at that moment, then SIGKILL it."""
    ready, _, _ = select.select([read_end], [], [], 30)
    if not ready:
        seen["error"] = "the hooked write never happened"
        return
    pid, temporary, entry = os.read(read_end, 4096).decode().split()
    seen["entry_before_kill"] = os.path.exists(entry)
    seen["temporary_before_kill"] = os.path.exists(temporary)
    seen["entry"], seen["temporary"] = entry, temporary
    os.kill(int(pid), signal.SIGKILL)


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:2 more threads running")  # the killer thread waits in select, holding no lock
@pytest.mark.parametrize("kind", ["memory", "dir"])
def test_a_worker_killed_mid_write_leaves_no_entry_and_the_sample_is_loaded_again(tmp_path, kind):
    read_end, write_end = os.pipe()
    seen: dict = {}
    killer = threading.Thread(target=_killer, args=(read_end, seen), daemon=True)
    killer.start()
    try:
        log = str(tmp_path / "calls")
        cache = "memory" if kind == "memory" else str(tmp_path / "cache")
        load = KilledMidWrite(log, HOOKED, write_end, str(tmp_path / "fired"))
        options = dict(shuffle=False, prefetch=2, start_method="fork")
        plain = stream_digest(epochs=3, workers=0, load=CountingLoad(str(tmp_path / "plain")), **options)
        assert stream_digest(epochs=3, workers=2, load=load, cache=cache, **options) == plain
        killer.join(30)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert "error" not in seen, seen
    assert seen["temporary_before_kill"] and not seen["entry_before_kill"]  # written whole, not yet visible
    assert sorted(calls(log)) == sorted([*range(N), HOOKED])  # loaded again after the kill, then never
    if kind == "dir":
        assert os.path.exists(seen["entry"])  # the redone batch's worker wrote it
        # the directory's next loader tidies the killed write away
        stream_digest(epochs=1, workers=0, shuffle=False, load=load, cache=cache)
        assert not os.path.exists(seen["temporary"])
    else:
        assert seen["temporary"].startswith(SHM_DIR)  # a segment of the loader: gone with it (no_leaks checks)
