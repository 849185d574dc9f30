"""Resume (contract 3.2, 3.9): a state saved mid-epoch on one executor, loaded on a fresh loader on any
executor (every ordered pair), yields exactly the rest of the uninterrupted stream; the state holds no data."""

from __future__ import annotations

import itertools
import pickle

import pytest
import registry
from workloads import BATCH_SIZE, DATA_X, LABELS, OPTIONS, N, digest, reference

TAKEN = N // BATCH_SIZE - 2  # mid-epoch: the resumed part crosses the epoch boundary
# A state is a few numbers (seed, position, ...): far below the data it indexes (DATA_X alone is 600 bytes).
STATE_BYTES = 1024


@pytest.mark.contract(registry.RESUME)
def test_a_state_saved_mid_epoch_resumes_on_every_executor(saved_on, loaded_on):
    expected = list(reference()[0])
    with saved_on.loader(DATA_X, LABELS, **OPTIONS) as loader:
        first = [digest(batch) for batch in itertools.islice(loader.stream(), TAKEN)]
        state = loader.state_dict()
    assert len(pickle.dumps(state)) < STATE_BYTES, state
    with loaded_on.loader(DATA_X, LABELS, **OPTIONS) as loader:
        loader.load_state_dict(state)
        rest = [digest(batch) for batch in loader.stream()]
    assert first == expected[:TAKEN]
    assert rest == expected[TAKEN:]
