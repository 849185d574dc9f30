"""Safety of yielded data (issue 10): whatever the training loop does to its batches -- in-place
writes to arrays, appending to lists, changing dicts -- the stream is the same for every ``workers``
value: a batch never aliases the sources, with ``workers=0`` as with workers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import fingerprint

import prefetch

N = 12
IMAGES = np.arange(N * 4, dtype=np.float32).reshape(N, 4)
LABELS = np.arange(N)


def vandalize(value: Any) -> None:
    """What a careless training loop may do to a batch it holds: write into everything it can."""
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            for item in value.flat:
                vandalize(item)
        elif value.flags.writeable and value.size:
            value *= 2
            value += 1
    elif isinstance(value, dict):
        for item in value.values():
            vandalize(item)
        value["vandal"] = True
    elif isinstance(value, list):
        for item in value:
            vandalize(item)
        value.append("vandal")
    elif isinstance(value, tuple):
        for item in value:
            vandalize(item)


def run(sources, vandal: bool, **options) -> list:
    got = []
    with prefetch.Loader(*sources, batch_size=5, epochs=3, seed=2, **options) as loader:
        for batch in loader.stream():
            got.append(fingerprint(batch))
            if vandal:
                vandalize(batch)
    return got


def first_half(x):
    return x[:2]  # a view of the sample


def same(sample):
    return sample


def listed(samples):
    return samples  # a collate that keeps the samples list as it is


class RowsSource:
    """A user class whose samples are views of its own array."""

    def __init__(self) -> None:
        self.data = IMAGES.copy()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data[i]


def object_rows() -> np.ndarray:
    """An object array whose items are arrays (the trailing None keeps numpy from stacking them)."""
    return np.array([row.copy() for row in IMAGES] + [None], dtype=object)[:N]


CASES: dict[str, Any] = {
    "numpy, collate=list": (lambda: (IMAGES.copy(), LABELS.copy()), {"collate": "list"}),
    "numpy, view transform": (lambda: (IMAGES.copy(),), {"collate": "list", "transform": first_half}),
    "numpy, collate callable": (lambda: (IMAGES.copy(),), {"collate": listed}),
    "numpy, identity batch_transform": (lambda: (IMAGES.copy(),), {"collate": "list", "batch_transform": same}),
    "list of arrays": (lambda: ([row.copy() for row in IMAGES],), {"collate": "list"}),
    "list of arrays, auto": (lambda: ([row.copy() for row in IMAGES], list(range(N))), {}),
    "list of dicts": (lambda: ([{"x": row.copy(), "tags": [1, 2]} for row in IMAGES],), {"collate": "list"}),
    "list of lists, auto": (lambda: ([[int(i), [int(i)]] for i in LABELS],), {}),
    "user class of views": (lambda: (RowsSource(),), {"collate": "list", "transform": same}),
    "object array": (lambda: (object_rows(),), {"collate": "list"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_writing_into_batches_changes_no_later_batch_with_any_workers(case):
    make_sources, options = CASES[case]
    expected = run(make_sources(), vandal=False, workers=0, **options)
    for workers in (0, 2):
        assert run(make_sources(), vandal=True, workers=workers, **options) == expected, f"workers={workers}"


def test_sources_are_untouched_after_a_vandal_loop():
    images = IMAGES.copy()
    rows = [row.copy() for row in IMAGES]
    run((images, rows), vandal=True, workers=0, collate="list")
    assert np.array_equal(images, IMAGES) and all(np.array_equal(a, b) for a, b in zip(rows, IMAGES))


def test_fresh_arrays_are_not_copied_again():
    """Only what aliases a source is copied: a transform's new array is yielded as it is."""
    made = []

    def fresh(x):
        out = x * 2
        made.append(out)
        return out

    with prefetch.Loader(IMAGES, batch_size=4, epochs=1, workers=0, collate="list", transform=fresh) as loader:
        batch = next(iter(loader))
    assert all(any(leaf is out for out in made) for leaf in batch)
