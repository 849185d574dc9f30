"""The Ray executor's stream is the processes executor's, for any actor count; resume crosses executors."""

from __future__ import annotations

import numpy as np
import pytest
from driver import Driver, config, take
from rayhelpers import augment, batch_noise, digests, processes_stream

import prefetch
from prefetch.ray_executor import RayExecutor

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

DATA_X = np.random.default_rng(0).random((203, 5)).astype(np.float32)
DATA_Y = np.arange(203)
# 203 samples in batches of 16: an epoch ends inside batch 12, so batch 12 straddles two epochs.
OPTIONS = {"batch_size": 16, "epochs": 2, "seed": 1234, "transform": augment, "batch_transform": batch_noise}


@pytest.fixture(scope="module")
def reference():
    return digests(processes_stream(DATA_X, DATA_Y, **OPTIONS))


@pytest.mark.parametrize("actors", [1, 3])
def test_same_batches_as_processes_over_an_epoch_boundary(local_ray, reference, actors):
    cfg = config(DATA_X, DATA_Y, workers=actors, **OPTIONS)
    got = take(Driver(cfg, RayExecutor()))
    assert len(got) == len(reference) == 26
    assert digests(got) == reference


def test_resume_from_processes_on_ray_and_back(local_ray, reference):
    with prefetch.Loader(DATA_X, DATA_Y, workers=2, start_method="forkserver", **OPTIONS) as loader:
        first = [batch for _, batch in zip(range(7), loader)]
        state = loader.state_dict()
    # processes -> ray: the state's position and seed are all a Ray run needs
    cfg = config(DATA_X, DATA_Y, workers=2, **{**OPTIONS, "seed": state["seed"]})
    driver = Driver(cfg, RayExecutor(), start=state["position"])
    middle = take(driver, 8)
    # ray -> processes: the state a loader at the Ray run's position would save
    state = {**state, "position": driver.position}
    with prefetch.Loader(DATA_X, DATA_Y, workers=2, start_method="forkserver", **OPTIONS) as loader:
        loader.load_state_dict(state)
        rest = list(loader)
    assert digests(first + middle + rest) == reference


def test_arrays_are_writable_by_default_and_views_without_copy(local_ray):
    cfg = config(DATA_X, DATA_Y, workers=1, batch_size=64, epochs=1, seed=1)
    copied = take(Driver(cfg, RayExecutor()), 1)[0]
    assert copied[0].flags.writeable and copied[1].flags.writeable
    views = take(Driver(cfg, RayExecutor(copy=False)), 1)[0]
    assert not views[0].flags.writeable
    np.testing.assert_array_equal(copied[0], views[0])
