"""torch's global generator is seeded per batch like ``random`` and ``np.random`` (PRODUCT.md 3.1, issue 17).

A transform that draws from torch (every torchvision augmentation does) gets the same numbers for any
``workers``, start method, ``prefetch`` depth and resume point; no two batches share draws; with
``workers=0`` the caller's torch state is left as it was; and torch's stream is not NumPy's or Python's.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import prefetch

torch = pytest.importorskip("torch")

from torchhelpers import (  # noqa: E402  (after importorskip: the module imports torch)
    IMAGES,
    every_generator,
    random_crop_flip,
    sha256_of,
    torch_draws,
)

pytestmark = pytest.mark.timeout(120)

TRANSFORMS = {"draws": torch_draws, "crop_flip": random_crop_flip}
# 40 samples in batches of 8, two epochs: 10 batches; shuffled, so the order is seeded too.
OPTIONS = {"batch_size": 8, "epochs": 2, "seed": 2024}


def loader(transform: str, **options) -> prefetch.Loader:
    return prefetch.Loader(IMAGES, transform=TRANSFORMS[transform], **{**OPTIONS, **options})


def whole_stream(transform: str, **options) -> str:
    with loader(transform, **options) as running:
        return sha256_of(running.stream())


@pytest.fixture(scope="module")
def reference() -> dict[str, str]:
    return {name: whole_stream(name, workers=0) for name in TRANSFORMS}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize(("workers", "depth"), [(1, None), (2, None), (2, 1), (3, 6)])
def test_same_stream_for_any_workers_and_depth(reference, transform, workers, depth):
    assert whole_stream(transform, workers=workers, prefetch=depth) == reference[transform]


@pytest.mark.start_methods("fork", "spawn", "forkserver")
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_same_stream_for_every_start_method(reference, transform, start_method):
    """Under spawn and forkserver the coordinator unpickles the transform, which imports torch there
    (torchhelpers imports it at the top), so the workers it forks have torch loaded and seed it."""
    assert whole_stream(transform, workers=2, start_method=start_method) == reference[transform]


@pytest.mark.parametrize(("first_workers", "then_workers"), [(0, 0), (2, 1), (0, 2)])
def test_resume_mid_epoch_continues_the_stream(reference, first_workers, then_workers):
    with loader("crop_flip", workers=first_workers) as running:
        first = [batch.copy() for batch in itertools.islice(running.stream(), 3)]  # an epoch is 5 batches
        state = running.state_dict()
    with loader("crop_flip", workers=then_workers, seed=1) as resumed:
        resumed.load_state_dict(state)  # adopts the saved seed
        rest = [batch.copy() for batch in resumed.stream()]
    assert len(first) + len(rest) == 10
    assert sha256_of(first + rest) == reference["crop_flip"]


@pytest.mark.parametrize("workers", [0, 2])
def test_no_two_samples_share_a_draw(workers):
    with loader("draws", workers=workers) as running:
        floats = [value for _, u, _ in running.stream() for value in u.ravel().tolist()]
    assert len(floats) == 80 * 2
    assert len(set(floats)) == len(floats), "torch.rand gave the same numbers to different samples"


def test_workers_zero_leaves_the_callers_torch_state_as_it_was():
    torch.manual_seed(99)
    before = torch.get_rng_state()
    expected_next = torch.rand(4)  # what the caller's next draw would be without the loader
    torch.set_rng_state(before)
    with loader("crop_flip", workers=0) as running:
        for _ in running.stream():
            pass
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(4), expected_next)


@pytest.mark.parametrize("workers", [0, 2])
def test_torch_numpy_and_random_run_different_streams(workers):
    """torch's CPU generator, np.random and random are all MT19937; seeded from one value by the same
    routine they would yield the same 32-bit words (torch.randint(0, 2**31) takes every other one):
    each must get a seed of its own, so no word drawn from one turns up in another."""
    words = {"torch": set(), "np.random": set(), "random": set()}
    options = {**OPTIONS, "epochs": 1, "workers": workers}
    with prefetch.Loader(np.arange(40), transform=every_generator, **options) as running:
        for _, from_torch, from_numpy, from_random in running.stream():
            words["torch"].update(from_torch.ravel().tolist())
            words["np.random"].update(from_numpy.ravel().tolist())
            words["random"].update(from_random.ravel().tolist())
    assert all(len(drawn) == 40 * 16 for drawn in words.values())  # no repeats within a generator either
    for a, b in itertools.combinations(words, 2):
        assert not words[a] & words[b], f"{a} and {b} drew the same words: their streams are related"
