"""Clean lifecycle (contract 3.7, 3.9): however the loop ends -- ``close()``, the generator dropped, an
exception in the loop -- nothing of the loader is left: no process, no actor, no shared-memory segment, no
mapping or descriptor of one in this process. What the executor showed while running (``footprint``) is
what must be gone."""

from __future__ import annotations

import gc

import pytest
import registry
from faults import Boom
from helpers import wait_until
from workloads import BATCH_SIZE, DATA_X, LABELS, SEED


def _close(loader, stream) -> None:
    loader.close()


def _drop(loader, stream) -> None:
    del stream  # the caller's reference is the last but this one
    gc.collect()


def _raise(loader, stream) -> None:
    with pytest.raises(Boom), loader:
        for _ in stream:
            raise Boom("in the training step")


ENDINGS = {"close": _close, "dropped-generator": _drop, "exception-in-the-loop": _raise}


@pytest.mark.contract(registry.LIFECYCLE)
@pytest.mark.parametrize("ending", list(ENDINGS))
def test_nothing_is_left_however_the_loop_ends(executor, ending):
    loader = executor.loader(DATA_X, LABELS, batch_size=BATCH_SIZE, seed=SEED)  # endless
    stream = loader.stream()
    for _ in range(3):
        next(stream)
    seen = executor.footprint(loader)
    assert bool(seen) == (executor.options["workers"] != 0), seen  # workers show; workers=0 has none
    ENDINGS[ending](loader, stream)
    del stream
    try:
        wait_until(lambda: not registry.remains(seen), executor.settle_s)
    except AssertionError:
        raise AssertionError(f"{ending} left: {registry.remains(seen)}") from None
    loader.close()
