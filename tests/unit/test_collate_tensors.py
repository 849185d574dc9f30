"""``torch.Tensor`` samples without processes: ``collate="auto"`` stacks them like ``torch.stack``
into memory from ``alloc``; a slot carries them as arrays (no pickled bytes) and the reader hands
back tensors that view the slot and hold its lease; ``workers=0`` copies exactly the tensors that
alias a source; ``jax.Array`` samples become numpy arrays."""

from __future__ import annotations

import gc
import pickle
import sys
import types
import warnings
import weakref
from collections import namedtuple

import numpy as np
import pytest

from prefetch.core.aliasing import SourceMemory
from prefetch.core.collate import collate_auto
from prefetch.core.pipeline import make_batch
from prefetch.ipc.segments import new_prefix, unlink_prefix
from prefetch.ipc.slots import SlotReader, SlotWriter
from prefetch.validation import make_config

torch = pytest.importorskip("torch")

NUMPY_DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "complex64"]
Pair = namedtuple("Pair", ["image", "label"])


def samples_of(dtype: torch.dtype, shape: tuple[int, ...], count: int = 5) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(shape, generator=generator) * 10).to(dtype) for _ in range(count)]


def assert_same_tensor(got, want) -> None:
    """Equal dtype, shape and values (bit for bit: NaNs and signed zeros too)."""
    assert type(got) is torch.Tensor and got.dtype == want.dtype and got.shape == want.shape
    size = want.element_size()
    as_bytes = [t.detach().contiguous().reshape(-1).view(torch.uint8) if size else t for t in (got, want)]
    assert torch.equal(*as_bytes)


@pytest.fixture
def slot_io():
    prefix = new_prefix("tensortest")
    writer, reader = SlotWriter(prefix), SlotReader()
    try:
        yield writer, reader
    finally:
        writer.close()
        reader.close()
        unlink_prefix(prefix)


def through_slot(slot_io, samples, lease: bool = True):
    """Collate ``samples`` into a slot as a worker does, and read the batch back as the consumer does."""
    writer, reader = slot_io
    space = writer.space(0, None, 1 << 16)
    written = writer.write(0, space, collate_auto(samples, space.alloc))
    batch, held = reader.read(0, written, lease)
    return written, batch, held


def in_slot(tensor, held) -> bool:
    start = held.ctypes.data
    return start <= tensor.data_ptr() and tensor.data_ptr() + tensor.nbytes <= start + held.nbytes


# --- stacking ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", [(), (3, 4)], ids=["0-d", "3x4"])
def test_auto_stacks_tensors_as_torch_stack_does(dtype, shape):
    samples = samples_of(getattr(torch, dtype), shape)
    assert_same_tensor(collate_auto(samples), torch.stack(samples))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda t: t.t(), id="transposed"),
        pytest.param(lambda t: t[:, ::2], id="strided"),
        pytest.param(lambda t: t.to(torch.complex64).conj(), id="lazy conjugate"),
        pytest.param(lambda t: t.reshape(2, 2, 2, 3).contiguous(memory_format=torch.channels_last), id="channels_last"),
        pytest.param(lambda t: t.clone().requires_grad_(), id="requires grad"),
        pytest.param(lambda t: t.clone().requires_grad_() * 2, id="in a graph"),
    ],
)
def test_non_contiguous_and_autograd_tensors_stack_as_values(make):
    samples = [make(t) for t in samples_of(torch.float32, (4, 6))]
    got = collate_auto(samples)
    assert_same_tensor(got, torch.stack(samples).detach())
    assert not got.requires_grad


@pytest.mark.parametrize("dtype", ["bfloat16", "complex32", "float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("shape", [(), (2, 3)], ids=["0-d", "2x3"])
def test_a_dtype_numpy_lacks_travels_as_its_bits_and_views_the_slot(slot_io, dtype, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # complex32 is "experimental"
        samples = [t.to(getattr(torch, dtype)) for t in samples_of(torch.float32, shape)]
        want = torch.stack(samples)
        assert_same_tensor(collate_auto(samples), want)
        written, batch, held = through_slot(slot_io, samples)
        assert written.payload is None and written.arrays.tensors == ((0, dtype),)
        assert_same_tensor(batch, want)
        assert in_slot(batch, held)
        written, batch, held = through_slot(slot_io, [Pair(t, "x") for t in samples])  # pickled, out of band
        assert written.arrays is None and len(written.payload) < 1024
        assert_same_tensor(batch.image, want)
        assert in_slot(batch.image, held)


class Tagged(torch.Tensor):
    """A tensor subclass: torch.stack keeps the class, which an array cannot stand for."""


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda t: t.as_subclass(Tagged), id="subclass"),
        pytest.param(lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8), id="quantized"),
    ],
)
def test_tensors_an_array_cannot_stand_for_fall_back_to_torch_stack_and_travel_pickled(slot_io, make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors are "deprecated"
        samples = [make(t) for t in samples_of(torch.float32, (16, 16))]
        want = torch.stack(samples)
        got = collate_auto(samples)
        written, batch, _ = through_slot(slot_io, samples)
    assert type(got) is type(want) is type(batch) and got.dtype == want.dtype == batch.dtype
    assert torch.equal(got.int_repr(), want.int_repr()) if got.is_quantized else torch.equal(got, want)
    pickled = len(written.payload) if written.payload is not None else written.buffers[-1][1]  # (in the slot)
    assert written.arrays is None and pickled > 16 * 16 * 5  # torch's own pickle: the bytes are in it
    assert torch.equal(batch.int_repr(), want.int_repr()) if batch.is_quantized else torch.equal(batch, want)


def test_fields_mixing_tensors_arrays_numbers_and_text_each_stack_their_own_way():
    samples = [
        {"pair": Pair(torch.full((2,), i), np.full(3, i, np.int16)), "weight": 0.5 * i, "name": f"s{i}"}
        for i in range(4)
    ]
    batch = collate_auto(samples)
    assert isinstance(batch["pair"], Pair)
    assert_same_tensor(batch["pair"].image, torch.stack([s["pair"].image for s in samples]))
    assert isinstance(batch["pair"].label, np.ndarray) and batch["pair"].label.dtype == np.int16
    assert batch["weight"].tolist() == [0.0, 0.5, 1.0, 1.5] and batch["name"] == ["s0", "s1", "s2", "s3"]


@pytest.mark.parametrize(
    "samples, words",
    [
        ([torch.zeros(3), torch.zeros(3), torch.zeros(4)], ["shapes differ", "(3,) at positions [0, 1]", "(4,)"]),
        ([torch.zeros(3), torch.zeros(3, dtype=torch.float64)], ["dtypes differ", "torch.float64 at position [1]"]),
        ([torch.zeros(3), np.zeros(3)], ["shapes differ", "a ndarray (not a tensor) at position [1]"]),
    ],
    ids=["shape", "dtype", "an array among tensors"],
)
def test_tensors_that_do_not_stack_raise_naming_the_positions(samples, words):
    with pytest.raises(ValueError, match="cannot stack into one tensor") as raised:
        collate_auto(samples)
    assert all(word in str(raised.value) for word in words), raised.value


# --- through a slot ------------------------------------------------------------------------------


@pytest.mark.parametrize("container", ["tensor", "tuple", "dict"])
def test_stacked_tensors_travel_without_pickle_and_view_the_slot(slot_io, container):
    images, labels = samples_of(torch.float32, (3, 4)), samples_of(torch.int64, ())
    samples = {
        "tensor": images,
        "tuple": list(zip(images, labels, strict=True)),
        "dict": [{"x": x, "y": y} for x, y in zip(images, labels, strict=True)],
    }[container]
    written, batch, held = through_slot(slot_io, samples)
    assert written.payload is None and written.arrays is not None  # no pickle at all
    leaves = {"tensor": lambda: [batch], "tuple": lambda: list(batch), "dict": lambda: list(batch.values())}[
        container
    ]()
    for leaf, want in zip(leaves, [torch.stack(images), torch.stack(labels)], strict=False):
        assert_same_tensor(leaf, want)
        assert in_slot(leaf, held)  # a view of the slot, not a copy


def test_tensors_among_other_things_go_out_of_band_and_view_the_slot(slot_io):
    samples = [Pair(torch.full((64, 64), float(i)), f"label {i}") for i in range(4)]  # a namedtuple: pickled
    written, batch, held = through_slot(slot_io, samples)
    assert written.arrays is None and written.payload is not None
    assert len(written.payload) < 1024 < batch.image.nbytes  # the tensor's bytes are not in the pickle
    assert_same_tensor(batch.image, torch.stack([s.image for s in samples]))
    assert batch.label == [s.label for s in samples] and in_slot(batch.image, held)


def test_a_tensor_from_a_batch_transform_goes_out_of_band_too(slot_io):
    writer, reader = slot_io
    space = writer.space(0, None, 1 << 16)
    made = (torch.arange(1000.0).reshape(10, 100).t(), "tag")  # private memory, not contiguous
    written = writer.write(0, space, made)
    batch, held = reader.read(0, written, True)
    assert len(written.payload) < 1024 and in_slot(batch[0], held)
    assert_same_tensor(batch[0], made[0])


@pytest.mark.parametrize("pickled", [False, True], ids=["arrays", "pickle"])
def test_the_slot_is_released_only_when_the_user_drops_the_tensor(slot_io, pickled):
    images = samples_of(torch.float32, (8, 8))
    samples = [(image, "text") for image in images] if pickled else images
    _, batch, held = through_slot(slot_io, samples)
    released = []
    weakref.finalize(held, released.append, True)
    del held
    tensor = batch[0] if pickled else batch
    view = tensor[1:, 2]  # a view of the user's tensor keeps it too
    del batch, tensor
    gc.collect()
    assert not released
    del view
    gc.collect()
    assert released


def test_without_a_lease_the_tensor_is_a_copy(slot_io):
    images = samples_of(torch.float32, (8, 8))
    written, batch, held = through_slot(slot_io, images, lease=False)
    assert held is None and written.arrays.tensors == ((0, "float32"),)
    _, whole = slot_io[1].read(0, written, True)
    assert not in_slot(batch, whole)
    assert_same_tensor(batch, torch.stack(images))


# --- workers=0: what aliases a source is copied, nothing else ----------------------------------


def test_tensor_views_of_a_tensor_source_are_copied_with_workers_0():
    source = torch.arange(20.0).reshape(10, 2)
    config = make_config((source,), batch_size=4, collate="list", workers=0)
    batch, _ = make_batch(config, np.array([0, 3, 5, 9]), private=SourceMemory(config.sources))
    for row in batch:
        row.mul_(-1)
    assert torch.equal(source, torch.arange(20.0).reshape(10, 2))


def test_a_tensor_made_from_a_numpy_sample_is_copied_with_workers_0():
    source = np.arange(20.0).reshape(10, 2)
    config = make_config((source,), batch_size=4, collate="list", workers=0, transform=torch.from_numpy)
    batch, _ = make_batch(config, np.array([0, 3, 5, 9]), private=SourceMemory(config.sources))
    for row in batch:
        row.mul_(-1)
    assert np.array_equal(source, np.arange(20.0).reshape(10, 2))


def test_fresh_and_stacked_tensors_are_not_copied_with_workers_0():
    made = []

    def fresh(x):
        made.append(x * 2)
        return made[-1]

    source = torch.arange(20.0).reshape(10, 2)
    listed = make_config((source,), batch_size=4, collate="list", workers=0, transform=fresh)
    batch, _ = make_batch(listed, np.array([0, 3, 5, 9]), private=SourceMemory(listed.sources))
    assert all(any(row is out for out in made) for row in batch)
    stacked = make_config((source,), batch_size=4, workers=0)
    safety = SourceMemory(stacked.sources)
    memory = safety.for_batch()
    batch = collate_auto([source[i] for i in (0, 3)], memory.alloc)
    assert memory.detach(batch) is batch


# --- JAX -----------------------------------------------------------------------------------------


class FakeJaxArray:
    """Stands in for ``jax.Array``: an array-like that numpy converts with ``np.asarray``."""

    def __init__(self, values):
        self.values = np.asarray(values)

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)


@pytest.fixture
def fake_jax(monkeypatch):
    jax = types.ModuleType("jax")
    jax.Array = FakeJaxArray
    monkeypatch.setitem(sys.modules, "jax", jax)


def test_jax_arrays_are_stacked_into_a_numpy_array(fake_jax, slot_io):
    samples = [(FakeJaxArray(np.full((2, 3), i, np.float32)), i) for i in range(4)]
    written, batch, held = through_slot(slot_io, samples)
    images, labels = batch
    assert isinstance(images, np.ndarray) and images.dtype == np.float32 and images.shape == (4, 2, 3)
    assert images[:, 0, 0].tolist() == [0, 1, 2, 3] and labels.tolist() == [0, 1, 2, 3]
    assert written.payload is None and np.shares_memory(images, held)


def test_without_jax_such_objects_stay_a_list():
    samples = [FakeJaxArray([i]) for i in range(3)]
    assert "jax" not in sys.modules or pytest.skip("jax is imported in this process")
    assert collate_auto(samples) == samples


# --- through Ray's object store ------------------------------------------------------------------


def test_ray_batches_carry_tensors_as_arrays_and_open_them_over_a_writable_copy():
    from prefetch.ray_executor.transfer import TensorArray, portable, writable

    pair = (torch.ones(2, dtype=torch.bfloat16), "s")
    batch = {"x": torch.arange(6.0).reshape(2, 3), "pair": pair, "n": np.arange(3)}
    sent = portable(batch)
    assert isinstance(sent["x"], TensorArray) and isinstance(sent["pair"][0], TensorArray)
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(sent, protocol=5, buffer_callback=buffers.append)
    assert len(data) < 1024  # the tensors' bytes travel out of band, as arrays' do
    stored = pickle.loads(data, buffers=[bytes(buffer.raw()) for buffer in buffers])  # read-only, like the store's
    assert not stored["x"].array.flags.writeable
    opened = writable(stored)
    assert_same_tensor(opened["x"], batch["x"])
    assert_same_tensor(opened["pair"][0], batch["pair"][0])
    opened["x"].add_(1)  # over a copy: the stored bytes stay as they were
    assert_same_tensor(writable(stored)["x"], batch["x"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # copy=False: torch's warning about a read-only array is not the user's
        views = writable(stored, copy=False)
    assert views["x"].data_ptr() == stored["x"].array.ctypes.data
