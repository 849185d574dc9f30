"""Samples of awkward kinds: they work (the same with and without workers) or fail with an error that says
which samples of the batch are the odd ones out."""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import fingerprint

import prefetch

N = 24
BAD = 13


class Samples:
    """A source whose sample ``i`` is ``make(i)``."""

    def __init__(self, make, n: int = N):
        self.make = make
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.make(i)


def odd_shape(i):
    return np.zeros((2, 3) if i != BAD else (3, 2), np.float32)


def odd_dtype(i):
    return np.zeros(3, np.float32 if i != BAD else np.float64)


def odd_none(i):
    return np.zeros(3) if i != BAD else None


def odd_text(i):
    return float(i) if i != BAD else "thirteen"


def first_error(source, workers: int) -> BaseException:
    with (
        prefetch.Loader(source, batch_size=4, seed=5, epochs=1, workers=workers) as loader,
        pytest.raises(ValueError) as info,
    ):
        for _ in loader:
            pass
    return info.value


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    ("make", "what"),
    [
        (odd_shape, r"shapes differ: \(2, 3\) at positions \[[0-9, ]+\]; \(3, 2\) at position \[(\d)\]"),
        (odd_dtype, r"dtypes differ: float32 at positions \[[0-9, ]+\]; float64 at position \[(\d)\]"),
        (
            odd_none,
            r"shapes differ: \(3,\) at positions \[[0-9, ]+\]; a NoneType \(not an array\) at position \[(\d)\]",
        ),
        (odd_text, r"numbers and text are mixed: float at positions \[[0-9, ]+\]; str at position \[(\d)\]"),
    ],
    ids=["shape", "dtype", "None", "text"],
)
def test_an_odd_sample_out_is_named(make, what, workers):
    """The message gives each shape or dtype with its positions; the note lists the batch's sample
    indices in the same order, so together they name the sample."""
    exc = first_error(Samples(make), workers)
    match = re.search(what, str(exc))
    assert match, str(exc)
    notes = " ".join(getattr(exc, "__notes__", []))
    listed = re.search(r"collate of samples \[([0-9, ]+)\]", notes)
    assert listed, notes
    indices = [int(i) for i in listed.group(1).split(",")]
    assert indices[int(match.group(1))] == BAD


def arrays_of_every_layout(i):
    base = np.arange(24, dtype=np.int16).reshape(4, 6) + i
    return {
        "object": np.array([i, None, "x"], dtype=object),
        "strided": base[:, ::2],  # not contiguous
        "reversed": base[::-1, ::-1],  # negative strides
        "fortran": np.asfortranarray(base),
        "scalar": np.array(i * 0.5),  # 0-d
        "none": None,
        "text": f"sample {i}",
        "number": i,
        "flag": bool(i % 2),
    }


def test_awkward_samples_work_the_same_with_workers(start_method):
    def run(**options):
        source = Samples(arrays_of_every_layout)
        with prefetch.Loader(source, batch_size=4, seed=2, epochs=1, **options) as loader:
            return [(fingerprint({k: v for k, v in b.items() if k != "object"}), b["object"].tolist()) for b in loader]

    got = run(workers=2, start_method=start_method)
    assert got == run(workers=0)
    with prefetch.Loader(Samples(arrays_of_every_layout), batch_size=4, shuffle=False, workers=2) as loader:
        batch = next(iter(loader))
    assert batch["object"].dtype == object and batch["object"].shape == (4, 3) and batch["object"][1, 1] is None
    np.testing.assert_array_equal(batch["reversed"][1], (np.arange(24, dtype=np.int16).reshape(4, 6) + 1)[::-1, ::-1])
    np.testing.assert_array_equal(batch["strided"][2], (np.arange(24, dtype=np.int16).reshape(4, 6) + 2)[:, ::2])
    assert batch["scalar"].shape == (4,) and batch["scalar"].tolist() == [0.0, 0.5, 1.0, 1.5]
    assert batch["none"] == [None] * 4 and batch["text"] == [f"sample {i}" for i in range(4)]
    assert batch["number"].dtype == np.int64 and batch["flag"].dtype == np.bool_


def growing(i):
    """Batches of 4 samples: 1000 bytes each for the first 8 batches, then 12 MB each."""
    return np.full(250 if i < 32 else 3_000_000, i % 251, dtype=np.uint8)


def test_a_batch_far_larger_than_the_slots_so_far():
    with prefetch.Loader(Samples(growing, n=40), batch_size=4, shuffle=False, epochs=1, workers=2) as loader:
        held = list(loader)  # kept alive: the grown slots must not overwrite earlier batches
    assert [b.nbytes for b in held] == [1000] * 8 + [12_000_000] * 2
    for number, batch in enumerate(held):
        assert (batch == (np.arange(number * 4, number * 4 + 4) % 251)[:, None]).all()
