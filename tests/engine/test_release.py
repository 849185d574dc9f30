"""Release on close (issue 10): a closed loader keeps no mapping of and no descriptor to a segment
in the consumer -- at once when no batch is held, whether or not the loader object lives on, and
otherwise as soon as the user drops the last batch it still holds."""

from __future__ import annotations

import os

import numpy as np

import prefetch
from prefetch.ipc.segments import NAME_ROOT, SHM_DIR

# 4 MiB batches: what the issue measured (24 MiB and 8 descriptors stayed after close())
ROWS = 64
ROW_SHAPE = (128, 128)
DATA = np.arange(ROWS * 128 * 128, dtype=np.float32).reshape(ROWS, *ROW_SHAPE)
BATCH_SIZE = 64


def mapped_bytes() -> int:
    """Bytes of prefetch segments mapped in this process."""
    total = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            if os.path.join(SHM_DIR, NAME_ROOT) in line:
                start, end = line.split()[0].split("-")
                total += int(end, 16) - int(start, 16)
    return total


def segment_descriptors() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(os.path.join(SHM_DIR, NAME_ROOT))
        except OSError:
            pass
    return count


def test_close_unmaps_everything_while_the_loader_lives_on(start_method):
    kept = []
    for _ in range(3):
        loader = prefetch.Loader(DATA, batch_size=BATCH_SIZE, seed=1, workers=2, start_method=start_method)
        iterator = loader.stream()  # 8 batches of one-batch epochs
        kept.append((loader, iterator))  # both live on, as in the issue
        for _ in range(8):
            assert next(iterator).shape == (BATCH_SIZE, *ROW_SHAPE)
        assert mapped_bytes() > 0  # the engine did map its slots
        loader.close()
        assert mapped_bytes() == 0 and segment_descriptors() == 0
    assert all(repr(loader).endswith("closed)") for loader, _ in kept)


def test_a_batch_held_across_close_stays_valid_and_is_unmapped_when_dropped():
    loader = prefetch.Loader(DATA, batch_size=BATCH_SIZE, seed=1, shuffle=False, workers=2)
    iterator = loader.stream()
    held = next(iterator)
    view = held[3:5]  # a view of a view: it holds the slot too
    next(iterator)
    loader.close()
    assert 0 < mapped_bytes() <= held.nbytes + 2**20  # only the held batch's segment
    assert np.array_equal(view, DATA[3:5]) and np.array_equal(held, DATA)  # still readable, unchanged
    del held
    assert mapped_bytes() > 0  # the view alone keeps it
    del view, iterator
    assert mapped_bytes() == 0 and segment_descriptors() == 0


def test_a_finished_data_generator_leaves_nothing_mapped():
    gen = prefetch.data_generator(16, DATA, np.arange(ROWS), workers=2, seed=3)
    for _ in range(6):
        x, y = next(gen)
        assert x.shape == (16, *ROW_SHAPE) and y.shape == (16,)
    del x, y
    assert mapped_bytes() > 0
    gen.close()
    assert mapped_bytes() == 0 and segment_descriptors() == 0
