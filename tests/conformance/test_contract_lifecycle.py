"""Clean lifecycle (contract 3.7, 3.9): however the loop ends -- ``close()``, the generator dropped, an
exception in the loop -- nothing of the loader is left: no process, no actor, no shared-memory segment, no
mapping or descriptor of one in this process. What the executor showed while running (``footprint``) is
what must be gone."""

from __future__ import annotations

import gc

import pytest
import registry
from helpers import wait_until
from injected import Boom
from workloads import BATCH_SIZE, DATA_X, LABELS, SEED


def _close(loader, streams: list) -> None:
    loader.close()  # the generator stays referenced: close() alone must stop everything


def _drop(loader, streams: list) -> None:
    streams.clear()  # the last reference to the generator: it is finalised, the loader stays open


def _raise(loader, streams: list) -> None:
    with pytest.raises(Boom), loader:
        for _ in streams[0]:
            raise Boom("in the training step")


ENDINGS = {"close": _close, "dropped-generator": _drop, "exception-in-the-loop": _raise}


@pytest.mark.contract(registry.LIFECYCLE)
@pytest.mark.parametrize("ending", list(ENDINGS))
def test_nothing_is_left_however_the_loop_ends(executor, ending):
    loader = executor.loader(DATA_X, LABELS, batch_size=BATCH_SIZE, seed=SEED)  # endless
    streams = [loader.stream()]
    for _ in range(3):
        next(streams[0])
    seen = executor.footprint(loader)
    assert bool(seen) == (executor.options["workers"] != 0), seen  # workers show; workers=0 has none
    ENDINGS[ending](loader, streams)
    gc.collect()  # a batch in a reference cycle (the traceback pytest.raises keeps) lets its segment go
    try:
        wait_until(lambda: not registry.remains(seen), executor.settle_s)
    except AssertionError:
        raise AssertionError(f"{ending} left: {registry.remains(seen)}") from None
    streams.clear()
    loader.close()
