"""Writing batches into slots and reading them back: the pickle-free path for batches of
stacked arrays, and the pickle path for everything else."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import as_list

from prefetch.ipc.segments import new_prefix, unlink_prefix
from prefetch.ipc.slots import SlotReader, SlotWriter

DTYPES = ["float32", ">f4", "bool", "int8", "uint64", "complex64", "datetime64[ms]", "timedelta64[us]", "float16"]


@pytest.fixture
def slot_io():
    prefix = new_prefix("slottest")
    writer, reader = SlotWriter(prefix), SlotReader()
    try:
        yield writer, reader
    finally:
        writer.close()
        reader.close()
        unlink_prefix(prefix)


def _placed(space, value: np.ndarray) -> np.ndarray:
    array = space.alloc(value.shape, value.dtype)
    array[...] = value
    return array


def _roundtrip(slot_io, make_batch, lease: bool):
    writer, reader = slot_io
    space = writer.space(0, None, 1 << 16)
    batch = make_batch(space)
    written = writer.write(0, space, batch)
    out, held = reader.read(0, written, lease)
    return written, out, held


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lease", [True, False])
def test_stacked_arrays_travel_without_pickle_and_keep_dtype_shape_and_container(slot_io, dtype, lease):
    x = np.arange(24).reshape(4, 3, 2).astype(dtype)
    y = np.arange(4).astype(dtype)
    cases = {
        "array": lambda space: _placed(space, x),
        "tuple": lambda space: (_placed(space, x), _placed(space, y)),
        "dict": lambda space: {"image": _placed(space, x), "label": _placed(space, y)},
    }
    for container, make in cases.items():
        written, out, held = _roundtrip(slot_io, make, lease)
        assert written.arrays is not None and written.arrays.container == container
        assert written.payload is None
        leaves = [out] if container == "array" else list(out.values()) if container == "dict" else list(out)
        assert type(out) is {"array": np.ndarray, "tuple": tuple, "dict": dict}[container]
        for leaf, expected in zip(leaves, [x, y], strict=False):
            assert leaf.dtype == expected.dtype and leaf.shape == expected.shape
            np.testing.assert_array_equal(leaf, expected)
            if lease:
                assert leaf.base is held  # the lease keeps the slot until the user drops the batch
            else:
                assert held is None and not np.shares_memory(leaf, written_view(slot_io, written))
        if container == "dict":
            assert list(out) == ["image", "label"]


def written_view(slot_io, written) -> np.ndarray:
    """The whole of the reader's mapping of slot 0, as a leased read hands it out."""
    _, reader = slot_io
    _, whole = reader.read(0, written, True)
    return whole


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda space: (_placed(space, np.arange(6.0))[::2],), id="non-contiguous view"),
        pytest.param(lambda space: (_placed(space, np.arange(6.0)), np.arange(3)), id="a private array"),
        pytest.param(lambda space: [_placed(space, np.arange(6.0))], id="a list"),
        pytest.param(lambda space: (_placed(space, np.arange(6.0)), "text"), id="not an array"),
        pytest.param(
            lambda space: _placed(space, np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")])), id="structured dtype"
        ),
        pytest.param(lambda space: {1: _placed(space, np.arange(6.0))}, id="non-str keys"),
    ],
)
def test_anything_else_goes_through_pickle_unchanged(slot_io, make):
    captured = []

    def keep(space):
        captured.append(make(space))
        return captured[-1]

    written, out, _ = _roundtrip(slot_io, keep, lease=True)
    assert written.arrays is None
    assert type(out) is type(captured[0])
    assert as_list(out) == as_list(captured[0])
    if isinstance(out, np.ndarray):
        assert out.dtype == captured[0].dtype
