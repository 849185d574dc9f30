"""Collation without processes: collate_auto, collate_list, and stacking sample by sample."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest

from prefetch.core.collate import StreamingStack, collate_auto, collate_list
from prefetch.core.pipeline import make_batch
from prefetch.validation import make_config


def test_auto_stacks_arrays_numbers_and_recurses():
    Pair = namedtuple("Pair", ["a", "b"])
    samples = [{"x": np.full(2, i), "y": (i, float(i)), "p": Pair(np.int8(i), f"s{i}")} for i in range(3)]
    batch = collate_auto(samples)
    assert batch["x"].shape == (3, 2) and batch["y"][0].dtype == np.int64 and batch["y"][1].dtype == np.float64
    assert isinstance(batch["p"], Pair) and batch["p"].a.dtype == np.int8 and batch["p"].b == ["s0", "s1", "s2"]


def test_list_gives_the_seed_lists():
    assert collate_list([("a", "A"), ("b", "B")]) == (["a", "b"], ["A", "B"])
    assert collate_list(["a", "b"]) == ["a", "b"]


@pytest.fixture(autouse=True)
def stream_every_size(monkeypatch):
    monkeypatch.setattr("prefetch.core.collate.STREAM_MIN_SAMPLE_BYTES", 0)


def _stream(samples):
    stack = StreamingStack(samples[0], len(samples), np.empty)
    for position, sample in enumerate(samples):
        if not stack.push(sample):
            return collate_auto(stack.rows_as_samples() + samples[position:])
    return stack.result()


@pytest.mark.parametrize(
    "samples",
    [
        [np.arange(6).reshape(2, 3) + i for i in range(4)],
        [(np.full(3, i, np.float32), i) for i in range(5)],
        [(np.full(3, i, np.float32), np.int64(i), 0.5 * i) for i in range(5)],
        [np.zeros(2, np.int32), np.zeros(2, np.int32), np.ones(2, np.float64)],  # dtype changes
        [(np.zeros(2), 1), (np.zeros(2), "label")],  # a leaf changes kind
        [np.array(1.5), np.array(2.5)],  # 0-d arrays
    ],
)
def test_streaming_stack_equals_collate_auto(samples):
    try:
        want = collate_auto(samples)
    except ValueError as error:  # then streaming must fail the same way
        with pytest.raises(ValueError) as streamed:
            _stream(samples)
        assert str(streamed.value) == str(error)
        return
    got = _stream(samples)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        if isinstance(w, np.ndarray):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)
        else:
            assert g == w


def test_streaming_stack_raises_collate_autos_error_on_a_shape_mismatch():
    samples = [np.zeros(3), np.zeros(3), np.zeros(4)]
    with pytest.raises(ValueError) as streamed:
        _stream(samples)
    with pytest.raises(ValueError) as direct:
        collate_auto(samples)
    assert str(streamed.value) == str(direct.value)


def test_make_batch_streams_and_matches_the_plain_collate():
    images = np.random.default_rng(0).integers(0, 255, (20, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(20)
    streamed = make_config((images, labels), batch_size=6, workers=0, seed=1, transform=lambda s: (s[0] + 1, s[1]))
    kept = make_config(
        (images, labels), batch_size=6, workers=0, seed=1, transform=lambda s: (s[0] + 1, s[1]), collate=collate_auto
    )
    indices = np.array([3, 1, 4, 15, 9, 2])
    (x1, y1), _ = make_batch(streamed, indices)
    (x2, y2), _ = make_batch(kept, indices)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert x1.dtype == x2.dtype and y1.dtype == y2.dtype
