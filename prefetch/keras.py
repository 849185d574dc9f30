"""Keras integration: ``StallMonitor``, a callback that reports the data stall of every epoch.

::

    from prefetch.keras import StallMonitor

    loader = prefetch.Loader(x_train, y_train, batch_size=32, transform=augment)
    history = model.fit(iter(loader), steps_per_epoch=loader.steps_per_epoch, epochs=10,
                        callbacks=[StallMonitor(loader)])
    history.history["data_stall"]          # per epoch: share of wall time spent waiting for data

At each epoch end it adds two entries to the epoch's logs, so they show in Keras'
progress bar and in ``History``:

* ``data_stall``: the fraction of the epoch's wall time the training loop spent
  waiting inside ``next()`` for a batch. Near 0: the data keeps up; near 1: the model
  waits for data (more ``workers``, cheaper transforms).
* ``data_samples_per_s``: samples the loader delivered per second of the epoch.

Keras itself is imported only when ``StallMonitor`` is first used: ``import prefetch``
and ``import prefetch.keras`` never import it.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["StallMonitor"]  # noqa: F822 - made on first use by __getattr__ (it imports Keras)

_class: type | None = None


def _find_loader(source: Any) -> Any:
    """The ``Loader`` behind ``source``: a Loader, or a generator from ``data_generator`` / ``iter(loader)``."""
    from .loader import Loader

    if isinstance(source, Loader):
        return source
    frame = getattr(source, "gi_frame", None)
    owner = frame.f_locals.get("self") if frame is not None else None
    if isinstance(owner, Loader):
        return owner
    raise TypeError(
        "StallMonitor needs the prefetch.Loader that feeds fit (or the generator that prefetch.data_generator "
        f"or iter(loader) returned, before it is exhausted); got {type(source).__name__}"
    )


class _Reading:
    """Cumulative figures of the loader's running engine: seconds waited and samples delivered."""

    def __init__(self, loader: Any):
        running = loader._running
        engine = running.engine or running.last
        recorder = getattr(engine, "recorder", None)
        self.engine = engine
        self.wait_s = float(recorder.wait_s) if recorder is not None else 0.0
        self.samples = int(recorder.samples) if recorder is not None else 0
        self.at = time.perf_counter()

    def since(self, start: _Reading) -> tuple[float, int, float]:
        """Seconds waited, samples delivered and wall seconds from ``start`` to this reading."""
        if self.engine is not start.engine:  # a new iteration started a new engine (its figures start at 0)
            return self.wait_s, self.samples, self.at - start.at
        return self.wait_s - start.wait_s, self.samples - start.samples, self.at - start.at


def _stall_monitor_class() -> type:
    global _class
    if _class is not None:
        return _class
    try:
        import keras
    except ImportError as exc:
        raise ImportError("prefetch.keras.StallMonitor needs Keras: pip install keras") from exc

    callback_base: Any = keras.callbacks.Callback

    class StallMonitor(callback_base):
        """Adds ``data_stall`` and ``data_samples_per_s`` to the logs at every epoch end.

        ``StallMonitor(loader)``: ``loader`` is the ``prefetch.Loader`` that feeds ``fit``
        (or the generator ``prefetch.data_generator`` returned). ``data_stall`` is the
        fraction of the epoch's wall time spent waiting for data.
        """

        def __init__(self, loader: Any):
            super().__init__()
            self.loader = _find_loader(loader)
            self._start: _Reading | None = None

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self._start = _Reading(self.loader)

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if self._start is None or logs is None:
                return
            waited, samples, wall = _Reading(self.loader).since(self._start)
            wall = max(wall, 1e-9)
            logs["data_stall"] = min(1.0, max(0.0, waited / wall))
            logs["data_samples_per_s"] = samples / wall

    StallMonitor.__module__ = __name__
    _class = StallMonitor
    return StallMonitor


def __getattr__(name: str) -> Any:
    if name == "StallMonitor":
        return _stall_monitor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
