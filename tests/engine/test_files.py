"""prefetch.Files: a map-style source over file paths, loaded in the workers."""

from __future__ import annotations

import pickle

import dill
import numpy as np
import pytest
from helpers import as_list

import prefetch
from prefetch.files import load_default

N_FILES = 300


@pytest.fixture(scope="module")
def npy_files(tmp_path_factory):
    """N_FILES small .npy files, file i holding a (4, 3) float32 array filled from i."""
    directory = tmp_path_factory.mktemp("npy")
    paths = []
    for i in range(N_FILES):
        path = directory / f"{i:04d}.npy"
        np.save(path, np.arange(12, dtype=np.float32).reshape(4, 3) + 100 * i)
        paths.append(path)
    return paths


def run(*sources, **options) -> list:
    with prefetch.Loader(*sources, **{"batch_size": 16, "epochs": 1, "seed": 7, **options}) as loader:
        return [as_list(batch) for batch in loader]


def test_npy_files_through_workers_equal_in_process(npy_files):
    labels = np.arange(N_FILES)
    # "short": an epoch is exactly the data's 300 files ("wrap" would complete its last batch from the next epoch)
    in_process = run(prefetch.Files(npy_files), labels, workers=0, last_batch="short")
    parallel = run(prefetch.Files(npy_files), labels, workers=2, last_batch="short")
    assert parallel == in_process
    # every file is loaded exactly once per epoch, and its content matches its label
    seen = []
    for x, y in in_process:
        for sample, label in zip(x, y):
            assert sample == (np.arange(12, dtype=np.float32).reshape(4, 3) + 100 * label).tolist()
            seen.append(label)
    assert sorted(seen) == list(range(N_FILES))


def test_files_under_spawn_with_a_lambda_loader(npy_files):
    files = prefetch.Files(npy_files[:40], load=lambda path: np.load(path).sum(dtype=np.float64))
    expected = run(files, workers=0, batch_size=8)
    assert run(files, workers=2, batch_size=8, start_method="spawn") == expected
    sums = sorted(v for batch in expected for v in batch)
    assert sums == sorted(float((np.arange(12) + 100 * i).sum()) for i in range(40))


def test_default_load_by_extension(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(3))
    np.savez(tmp_path / "b.npz", x=np.ones(2), y=np.zeros((2, 2)))
    (tmp_path / "c.txt").write_bytes(b"hello")
    (tmp_path / "d.NPY").write_bytes((tmp_path / "a.npy").read_bytes())
    files = prefetch.Files([tmp_path / "a.npy", str(tmp_path / "b.npz"), tmp_path / "c.txt", tmp_path / "d.NPY"])
    assert len(files) == 4
    assert files[0].tolist() == [0, 1, 2]
    assert set(files[1]) == {"x", "y"} and files[1]["y"].shape == (2, 2)
    assert files[2] == b"hello"
    assert files[np.int64(3)].tolist() == [0, 1, 2]
    assert files[-1].tolist() == [0, 1, 2]
    assert load_default(str(tmp_path / "c.txt")) == b"hello"


def test_npz_samples_collate_into_dicts(tmp_path):
    paths = []
    for i in range(10):
        paths.append(tmp_path / f"{i}.npz")
        np.savez(paths[-1], image=np.full((2, 2), i, dtype=np.uint8), label=np.int64(i))
    batches = run(prefetch.Files(paths), batch_size=5, shuffle=False, workers=2)
    assert [b["label"] for b in batches] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert batches[1]["image"][0] == [[5, 5], [5, 5]]


def test_slice_and_pickle_keep_paths_and_loader(npy_files):
    files = prefetch.Files(npy_files, load=np.load)
    part = files[10:20]
    assert isinstance(part, prefetch.Files) and len(part) == 10 and part.load is np.load
    assert part[0].tolist() == files[10].tolist()
    for dumps, loads in ((pickle.dumps, pickle.loads), (dill.dumps, dill.loads)):
        copy = loads(dumps(files))
        assert copy.paths == files.paths and copy[5].tolist() == files[5].tolist()
    assert "300 paths" in repr(files)


def test_bad_arguments_say_what_to_change(tmp_path):
    with pytest.raises(TypeError, match="sequence of file paths"):
        prefetch.Files(str(tmp_path))
    with pytest.raises(TypeError, match="sequence of file paths"):
        prefetch.Files(tmp_path)
    with pytest.raises(TypeError, match="load must be a function"):
        prefetch.Files([tmp_path / "a.npy"], load="np.load")


def test_a_missing_file_raises_in_the_consumer_with_its_type(tmp_path):
    np.save(tmp_path / "there.npy", np.zeros(2))
    files = prefetch.Files([tmp_path / "there.npy", tmp_path / "missing.npy"])
    with pytest.raises(FileNotFoundError, match=r"missing\.npy"):
        run(files, batch_size=2, workers=1)
