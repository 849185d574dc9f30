"""Data bigger than memory: a memmap source is read page by page, never loaded or copied whole."""

from __future__ import annotations

import numpy as np
import psutil
import pytest

import prefetch

FILE_BYTES = 2 * 2**30  # a sparse 2 GiB .npy file: far larger than anything the loader may hold
ROW_BYTES = 16 * 1024


def _rss_file_bytes(processes: list[psutil.Process]) -> int:
    """Resident file-backed pages (the mapped data file among them) of these processes."""
    total = 0
    for process in processes:
        try:
            with open(f"/proc/{process.pid}/status") as status:
                for line in status:
                    if line.startswith("RssFile:"):
                        total += int(line.split()[1]) * 1024
        except FileNotFoundError:
            continue
    return total


@pytest.mark.start_methods("fork", "spawn", "forkserver")
def test_a_memmap_larger_than_memory_is_never_loaded(tmp_path, start_method):
    rows = FILE_BYTES // ROW_BYTES
    big = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint8, shape=(rows, ROW_BYTES))
    big[::4096] = 7  # a few real pages; the rest of the file is a hole
    big.flush()
    del big
    source = np.load(tmp_path / "big.npy", mmap_mode="r")
    with prefetch.Loader(source, batch_size=32, workers=2, start_method=start_method, seed=0) as loader:
        batches = iter(loader)
        first = next(batches)
        processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
        before = _rss_file_bytes(processes)
        total = 0
        for _ in range(40):
            total += int(next(batches).sum() > 0)
        after = _rss_file_bytes(processes)
    assert first.shape == (32, ROW_BYTES)
    # 41 batches of 512 KiB are read; the kernel maps pages around each fault (fault-around,
    # read-ahead), so the resident part grows by a few times that -- and stays far below the file.
    assert after - before < FILE_BYTES / 10
