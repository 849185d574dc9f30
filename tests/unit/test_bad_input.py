"""Unusual but valid input (issue 10): numpy integers as options, and a batch_size larger than the
data, which works but warns once saying what happens (zero-byte samples: tests/engine/test_bad_input_workers.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import prefetch

N = 20


INT_OPTIONS = {"batch_size": 4, "seed": 3, "epochs": 2, "rank": 1, "world_size": 2, "workers": 0, "prefetch": 3}


@pytest.mark.parametrize("kind", [np.int64, np.int32, np.uint8, np.intp])
def test_numpy_integers_are_accepted_for_every_int_option(kind):
    data = np.arange(N)
    options = {name: kind(value) for name, value in INT_OPTIONS.items()}
    with prefetch.Loader(data, retries=kind(1), timeout=kind(5), **options) as loader:
        got = [batch.tolist() for batch in loader.stream()]
        assert type(loader.batch_size) is int and type(loader.seed) is int and loader.prefetch == 3
        state = loader.state_dict()
    assert got == [batch.tolist() for batch in prefetch.Loader(data, retries=1, timeout=5, **INT_OPTIONS).stream()]
    with prefetch.Loader(data, **INT_OPTIONS) as resumed:
        resumed.load_state_dict({**state, "position": kind(2)})
        assert [batch.tolist() for batch in resumed.stream()] == got[2:]


@pytest.mark.parametrize("name", list(INT_OPTIONS))
@pytest.mark.parametrize("value", [True, np.bool_(True)], ids=["bool", "np.bool_"])
def test_bools_are_still_refused_for_int_options(name, value):
    with pytest.raises(TypeError, match=rf"^{name} must be an int"):
        prefetch.Loader(np.arange(N), **{**INT_OPTIONS, name: value})


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({}, "each batch is completed from the next epochs, so it holds some samples more than once"),
        ({"epochs": 1}, "each batch is completed from the next epochs, so it holds some samples more than once"),
        ({"last_batch": "short"}, "every batch is a whole epoch of 20 samples, not 32"),
        ({"world_size": 2, "rank": 1, "batch_size": 12}, "larger than the 10 samples of rank 1's shard"),
    ],
    ids=["wrap", "finite", "short", "shard"],
)
def test_a_batch_larger_than_the_data_warns_once_saying_what_happens(options, says):
    options = {"batch_size": 32, "seed": 1, "workers": 0, **options}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = prefetch.Loader(np.arange(N), **options)
        batches = [batch for _, batch in zip(range(4), loader)]
    assert len(batches) >= 1
    warned = [w for w in caught if issubclass(w.category, prefetch.PrefetchWarning)]
    assert len(warned) == 1, [str(w.message) for w in caught]
    text = str(warned[0].message)
    assert says in text and f"batch_size={options['batch_size']} is larger than" in text, text
    assert warned[0].filename == __file__
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prefetch.data_generator(5, np.arange(N), np.arange(N), workers=0).close()  # no warning when it fits
    assert not caught
