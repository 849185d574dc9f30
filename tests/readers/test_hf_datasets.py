"""A Hugging Face ``datasets.Dataset`` is a source as it is: memory-mapped Arrow, read by index in the workers."""

from __future__ import annotations

import dill
import numpy as np
import pytest
from shardhelpers import TableKind, resumed_digests, row_transform, stream_digests

import prefetch

datasets = pytest.importorskip("datasets")

ROWS = 300
TEXT_BYTES = 20_000  # per row: 6 MB of text, so that a copy of the table would show in a pickle's size


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    """A data set saved with save_to_disk and loaded back: its table is memory-mapped Arrow files."""
    tqdm = pytest.importorskip("tqdm")
    # the bars of save_to_disk and load_from_disk start no monitor thread (troubleshooting.md: the fork warning)
    interval, tqdm.tqdm.monitor_interval = tqdm.tqdm.monitor_interval, 0
    directory = tmp_path_factory.mktemp("hf")
    made = datasets.Dataset.from_dict(
        {
            "id": list(range(ROWS)),
            "text": [chr(65 + i % 26) * TEXT_BYTES for i in range(ROWS)],
            "values": [[float(i), float(i) / 2] for i in range(ROWS)],
        }
    )
    made.save_to_disk(str(directory / "set"))
    loaded = datasets.load_from_disk(str(directory / "set"))
    tqdm.tqdm.monitor_interval = interval
    return loaded


def test_the_dataset_is_memory_mapped_and_pickles_without_its_table(on_disk):
    """What a spawned coordinator (dill) or a Ray actor receives: the paths of its Arrow files, not the rows."""
    assert on_disk.cache_files  # backed by files on disk
    assert len(dill.dumps(on_disk)) < ROWS * TEXT_BYTES / 100
    in_memory = datasets.Dataset.from_dict(on_disk[:])  # the same rows, held in memory: pickled whole
    assert len(dill.dumps(in_memory)) > ROWS * TEXT_BYTES


def test_workers_read_the_memory_mapped_table(on_disk, start_method):
    """A worker's copy of the data set maps the same Arrow files (forked: inherited; spawned: reopened)."""
    assert type(on_disk.data).__name__ == "MemoryMappedTable"
    with prefetch.Loader(TableKind(on_disk), batch_size=50, epochs=1, workers=2, start_method=start_method) as loader:
        ids, kinds = zip(*(sample for batch in loader for sample in zip(*batch)))
    assert sorted(ids) == list(range(ROWS)) and set(kinds) == {"MemoryMappedTable"}


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_streams_equal_for_any_workers_and_start_method(on_disk, start_method, workers):
    expected = stream_digests(on_disk, workers=0, transform=row_transform)
    assert len(expected) == 2 * 38
    assert stream_digests(on_disk, workers=workers, start_method=start_method, transform=row_transform) == expected


def test_batches_hold_the_rows(on_disk):
    with prefetch.Loader(on_disk, batch_size=10, shuffle=False, epochs=1, workers=2) as loader:
        batch = next(iter(loader))
    assert batch["id"].tolist() == list(range(10)) and batch["text"][3] == "D" * TEXT_BYTES
    assert np.array_equal(batch["values"][4], [4.0, 2.0])


def test_resume_mid_epoch(on_disk):
    whole = stream_digests(on_disk, workers=2, transform=row_transform)
    assert resumed_digests(on_disk, 40, workers=2, transform=row_transform) == whole[40:]
