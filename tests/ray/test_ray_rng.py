"""Ray actors seed torch's global generator per batch as worker processes do: the same stream."""

from __future__ import annotations

import itertools

import pytest

import prefetch

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

torch = pytest.importorskip("torch")

from torchhelpers import IMAGES, random_crop_flip, sha256_of, torch_draws  # noqa: E402  (imports torch)

TRANSFORMS = {"draws": torch_draws, "crop_flip": random_crop_flip}
OPTIONS = {"batch_size": 8, "epochs": 2, "seed": 2024}


def whole_stream(transform: str, **options) -> str:
    with prefetch.Loader(IMAGES, transform=TRANSFORMS[transform], **{**OPTIONS, **options}) as loader:
        return sha256_of(loader.stream())


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("actors", [1, 2])
def test_torch_draws_are_the_in_process_stream(local_ray, transform, actors):
    assert whole_stream(transform, workers=actors, executor="ray") == whole_stream(transform, workers=0)


def test_resume_on_ray_continues_the_torch_stream(local_ray):
    with prefetch.Loader(IMAGES, transform=random_crop_flip, workers=0, **OPTIONS) as loader:
        first = [batch.copy() for batch in itertools.islice(loader.stream(), 3)]
        state = loader.state_dict()
    with prefetch.Loader(IMAGES, transform=random_crop_flip, workers=2, executor="ray", **OPTIONS) as loader:
        loader.load_state_dict(state)
        rest = [batch.copy() for batch in loader.stream()]
    assert sha256_of(first + rest) == whole_stream("crop_flip", workers=0)
