"""``torch.Tensor`` samples through worker processes (issue 17): ``collate="auto"`` yields one stacked
tensor per field, equal to ``torch.stack`` of the samples and the same for every ``workers`` value and
start method; the tensor views its shared-memory slot and never changes while the user holds it."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from helpers import MixedTensorSource, fingerprint

import prefetch
from prefetch.ipc.segments import NAME_ROOT, SHM_DIR

torch = pytest.importorskip("torch")

N, BATCH = 48, 8
IMAGES = torch.randn(N, 3, 4, generator=torch.Generator().manual_seed(0))
LABELS = torch.arange(N)


def stream(*sources, **options) -> list:
    """Every batch of two epochs."""
    options = {"batch_size": BATCH, "epochs": 2, "seed": 3, **options}
    with prefetch.Loader(*sources, **options) as loader:
        return list(loader.stream())


def digest(batches: list) -> str:
    return hashlib.sha256(repr([fingerprint(batch) for batch in batches]).encode()).hexdigest()


def mapped_segments() -> list[tuple[int, int]]:
    """The address ranges of this process's mappings of prefetch segments."""
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if os.path.join(SHM_DIR, NAME_ROOT) in line:
                start, end = line.split()[0].split("-")
                found.append((int(start, 16), int(end, 16)))
    return found


def views_a_slot(tensor) -> bool:
    return any(start <= tensor.data_ptr() < end for start, end in mapped_segments())


def test_tensor_samples_make_the_tensors_torch_stack_makes(start_method):
    """In order (no shuffle), batch k stacks samples k*BATCH... : computed here with torch.stack."""
    got = stream(IMAGES, LABELS, shuffle=False, workers=2, start_method=start_method)
    assert len(got) == 2 * N // BATCH
    for number, (images, labels) in enumerate(got):
        rows = [(number * BATCH + i) % N for i in range(BATCH)]
        want_images, want_labels = torch.stack([IMAGES[i] for i in rows]), torch.stack([LABELS[i] for i in rows])
        assert type(images) is torch.Tensor and images.dtype == want_images.dtype and torch.equal(images, want_images)
        assert type(labels) is torch.Tensor and labels.dtype == torch.int64 and torch.equal(labels, want_labels)


def test_the_same_tensor_stream_for_every_workers_value(start_method):
    reference = stream(IMAGES, LABELS, workers=0, transform=lambda s: (s[0] * 2, s[1]))
    got = stream(IMAGES, LABELS, workers=2, start_method=start_method, transform=lambda s: (s[0] * 2, s[1]))
    assert digest(got) == digest(reference)
    assert all(type(images) is type(labels) is torch.Tensor for images, labels in got)


def test_samples_mixing_tensors_arrays_numbers_and_text(start_method):
    source = MixedTensorSource(N)
    reference = stream(source, workers=0)
    got = stream(source, workers=2, start_method=start_method)
    assert digest(got) == digest(reference)
    batch = got[0]
    assert type(batch["pair"][0]) is torch.Tensor and batch["pair"][0].shape == (BATCH, 2, 3)
    assert isinstance(batch["pair"][1], np.ndarray) and batch["pair"][1].dtype == np.int16
    assert type(batch["label"]) is torch.Tensor and batch["label"].dtype == torch.int64
    assert isinstance(batch["weight"], np.ndarray) and len(batch["name"]) == BATCH


def test_a_yielded_tensor_views_its_slot():
    with prefetch.Loader(IMAGES, LABELS, batch_size=BATCH, workers=2, seed=1) as loader:
        images, labels = next(iter(loader))
        assert views_a_slot(images) and views_a_slot(labels)  # no copy, no pickle: the slot's own memory
        del images, labels


def test_bfloat16_tensors_stream_the_same_and_view_their_slot():
    images = IMAGES.to(torch.bfloat16)
    reference = stream(images, workers=0)
    with prefetch.Loader(images, batch_size=BATCH, epochs=2, seed=3, workers=2) as loader:
        got = []
        for batch in loader.stream():  # (keeping no batch: one the user holds past the depth is a copy)
            assert batch.dtype == torch.bfloat16 and views_a_slot(batch)
            got.append(fingerprint(batch))
    assert got == [fingerprint(batch) for batch in reference]


@pytest.mark.parametrize("workers", [0, 2])
def test_held_tensor_batches_never_change_while_later_ones_are_made(workers):
    """The loop keeps every batch (more than the prefetch depth, so later ones are copied out of their
    slots) and writes into each: what it holds stays what it was given."""
    kept, seen = [], []
    with prefetch.Loader(IMAGES, LABELS, batch_size=BATCH, epochs=3, seed=5, workers=workers, prefetch=2) as loader:
        for images, labels in loader.stream():
            seen.append(fingerprint((images, labels)))
            kept.append((images, labels))
            images.neg_()  # the user's own batch: changes nothing else
            labels.neg_()
    assert len(kept) == 3 * N // BATCH
    for (images, labels), before in zip(kept, seen, strict=True):
        images.neg_()
        labels.neg_()
        assert fingerprint((images, labels)) == before


def vandalize(value) -> None:
    """What a careless loop may do to a batch it holds: write into every tensor, array and list."""
    if isinstance(value, torch.Tensor):
        value.mul_(2).add_(1)
    elif isinstance(value, np.ndarray):
        value *= 2
        value += 1
    elif isinstance(value, dict):
        for item in value.values():
            vandalize(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            vandalize(item)
        if isinstance(value, list):
            value.append("vandal")


def first_row(image):
    return image[0]  # a view of the sample


ALIASING = {
    "tensor source, collate=list": (lambda: (IMAGES.clone(),), {"collate": "list"}),
    "tensor source, view transform": (lambda: (IMAGES.clone(),), {"collate": "list", "transform": first_row}),
    "numpy source, torch.from_numpy": (
        lambda: (IMAGES.numpy().copy(),),
        {"collate": "list", "transform": torch.from_numpy},
    ),
    "list of tensors, collate=auto": (lambda: ([row.clone() for row in IMAGES], list(range(N))), {}),
    "tensor sources, collate=auto": (lambda: (IMAGES.clone(), LABELS.clone()), {}),
}


@pytest.mark.parametrize("case", list(ALIASING))
def test_writing_into_tensor_batches_changes_no_later_batch_with_any_workers(case):
    """With workers=0 a tensor of the batch may view a source: it is copied, as a worker's slot would."""
    make_sources, options = ALIASING[case]

    def run(vandal: bool, workers: int) -> list:
        got = []
        with prefetch.Loader(*make_sources(), batch_size=5, epochs=3, seed=2, workers=workers, **options) as loader:
            for batch in loader.stream():
                got.append(fingerprint(batch))
                if vandal:
                    vandalize(batch)
        return got

    expected = run(vandal=False, workers=0)
    for workers in (0, 2):
        assert run(vandal=True, workers=workers) == expected, f"workers={workers}"
