"""The Ray executor's stream is the processes executor's, for any actor count; resume crosses executors."""

from __future__ import annotations

import numpy as np
import pytest
from rayhelpers import augment, batch_noise, digests, processes_stream

import prefetch

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

DATA_X = np.random.default_rng(0).random((203, 5)).astype(np.float32)
DATA_Y = np.arange(203)
# 203 samples in batches of 16: an epoch ends inside batch 12, so batch 12 straddles two epochs (and the
# last of the 26 full batches of two epochs takes 13 samples of a third); the transform draws from random,
# np.random and batch_rng(), the batch_transform from np.random.
OPTIONS = {"batch_size": 16, "epochs": 2, "seed": 1234, "transform": augment, "batch_transform": batch_noise}


@pytest.fixture(scope="module")
def reference():
    return digests(processes_stream(DATA_X, DATA_Y, **OPTIONS))


@pytest.mark.parametrize("actors", [1, 3])
def test_same_batches_as_processes_over_an_epoch_boundary(local_ray, reference, actors):
    with prefetch.Loader(DATA_X, DATA_Y, workers=actors, executor="ray", **OPTIONS) as loader:
        got = list(loader.stream())
    assert len(got) == len(reference) == 26
    assert digests(got) == reference


def test_resume_from_processes_on_ray_and_back(local_ray, reference):
    with prefetch.Loader(DATA_X, DATA_Y, workers=2, start_method="forkserver", **OPTIONS) as loader:
        first = [batch for _, batch in zip(range(7), loader.stream())]
        state = loader.state_dict()
    with prefetch.Loader(DATA_X, DATA_Y, workers=3, executor="ray", **{**OPTIONS, "seed": 1}) as loader:
        loader.load_state_dict(state)  # adopts the saved seed
        middle = [batch for _, batch in zip(range(8), loader.stream())]  # over the epoch boundary
        state = loader.state_dict()
    with prefetch.Loader(DATA_X, DATA_Y, workers=2, start_method="forkserver", **OPTIONS) as loader:
        loader.load_state_dict(state)
        rest = list(loader.stream())
    assert len(first + middle + rest) == 26
    assert digests(first + middle + rest) == reference


def test_arrays_are_writable_by_default_and_views_without_copy(local_ray):
    options = {"batch_size": 64, "epochs": 1, "seed": 1, "workers": 1}
    with prefetch.Loader(DATA_X, DATA_Y, executor=prefetch.RayExecutor(), **options) as loader:
        copied = next(iter(loader))
    with prefetch.Loader(DATA_X, DATA_Y, executor=prefetch.RayExecutor(copy=False), **options) as loader:
        views = next(iter(loader))
    assert copied[0].flags.writeable and copied[1].flags.writeable
    assert not views[0].flags.writeable
    np.testing.assert_array_equal(copied[0], views[0])


@pytest.mark.parametrize("copy", [True, False])
def test_tensor_batches_are_the_processes_executors_and_writable_by_default(local_ray, copy):
    torch = pytest.importorskip("torch")
    images = torch.from_numpy(DATA_X[:64].copy()).to(torch.bfloat16)
    options = {"batch_size": 16, "epochs": 1, "seed": 1}
    reference = processes_stream(images, torch.from_numpy(DATA_Y[:64].copy()), **options)
    executor = prefetch.RayExecutor(copy=copy)
    with prefetch.Loader(
        images, torch.from_numpy(DATA_Y[:64].copy()), workers=2, executor=executor, **options
    ) as loader:
        got = list(loader)
    assert all(type(x) is type(y) is torch.Tensor and x.dtype == torch.bfloat16 for x, y in got)
    assert digests(got) == digests(reference)
    if copy:
        got[0][0].add_(1)  # a tensor over a copy of its array: the user's own
