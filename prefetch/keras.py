"""Keras integration: ``StallMonitor``, a callback that reports the data stall and the CPU sharing of every epoch.

::

    from prefetch.keras import StallMonitor

    loader = prefetch.Loader(x_train, y_train, batch_size=32, epochs=10, transform=augment)
    history = model.fit(loader.stream(), steps_per_epoch=len(loader), epochs=10, shuffle=False,
                        callbacks=[StallMonitor(loader)])
    history.history["data_stall"]          # per epoch: share of wall time spent waiting for data

At each epoch end it adds three entries to the epoch's logs, so they show in Keras'
progress bar and in ``History``:

* ``data_stall``: the fraction of the epoch's wall time the training loop spent
  waiting inside ``next()`` for a batch. Near 0: the data keeps up; near 1: the model
  waits for data (more ``workers``, cheaper transforms).
* ``data_samples_per_s``: samples the loader delivered per second of the epoch.
* ``data_cpu_busy``: the CPU the training process (the step and its threads) and the
  workers used together over the epoch, as a share of the cores this process may use.
  Near 1 with a low stall: the step and the workers fill the machine between them.

A low ``data_stall`` does not mean the loader costs nothing: the workers run on the
cores the training step would otherwise use. When the epoch's figures say the two
compete (``loader.stats().contention``), the callback warns once per ``fit`` with a
``prefetch.PrefetchWarning`` that names the cores, the threads and what to change.

Keras itself is imported only when ``StallMonitor`` is first used: ``import prefetch``
and ``import prefetch.keras`` never import it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .stats import Stats

__all__ = ["StallMonitor"]  # noqa: F822 - made on first use by __getattr__ (it imports Keras)

_class: type | None = None


def epoch_logs(window: Stats) -> dict[str, float]:
    """The figures ``StallMonitor`` adds to an epoch's logs, from the loader's figures over that epoch."""
    busy = (window.consumer_cpu + window.workers_cpu) / window.cores if window.cores else 0.0
    return {
        "data_stall": window.wait_fraction,
        "data_samples_per_s": window.samples_per_s,
        "data_cpu_busy": min(1.0, busy),
    }


def competing(window: Stats) -> str | None:
    """The sentence to warn with when the training step and the workers competed for the cores, else None.

    A loop that did no work between batches (``window.idle_loop``) waited by design, a loop that is
    not short of cores has nothing to be told, and without workers (``workers=0``) there is nothing to
    compete with: none of them warns."""
    note = window.contention
    if note is None or window.idle_loop or not window.worker_busy:
        return None
    return note


def _stall_monitor_class() -> type:
    global _class
    if _class is not None:
        return _class
    try:
        import keras
    except ImportError as exc:
        raise ImportError("prefetch.keras.StallMonitor needs Keras: pip install keras") from exc

    from .errors import PrefetchWarning
    from .loader import Loader

    callback_base: Any = keras.callbacks.Callback

    class StallMonitor(callback_base):
        """Adds ``data_stall``, ``data_samples_per_s`` and ``data_cpu_busy`` to the logs at every epoch end.

        ``StallMonitor(loader)``: ``loader`` is the ``prefetch.Loader`` that feeds ``fit``
        (or the generator ``loader.stream()``, ``prefetch.data_generator`` or ``iter(loader)`` returned).
        ``data_stall`` is the fraction of the epoch's wall time spent waiting for data;
        ``data_cpu_busy`` the share of the usable cores the training process and the
        workers used. Warns (``prefetch.PrefetchWarning``) once per ``fit`` when the
        training step and the workers compete for the cores.
        """

        def __init__(self, loader: Any):
            super().__init__()
            try:
                self.loader = Loader.of(loader)
            except TypeError as exc:
                raise TypeError(f"StallMonitor needs the prefetch.Loader that feeds fit: {exc}") from None
            self._start: Stats | None = None
            self._warned = False

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self._warned = False  # once per fit

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self._start = self.loader.stats()

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if self._start is None or logs is None:
                return
            window = self.loader.stats().since(self._start)
            logs.update(epoch_logs(window))
            note = competing(window)
            if note is not None and not self._warned:
                self._warned = True
                warnings.warn(f"epoch {epoch + 1}: {note}", PrefetchWarning, stacklevel=2)

    StallMonitor.__module__ = __name__
    _class = StallMonitor
    return StallMonitor


def __getattr__(name: str) -> Any:
    if name == "StallMonitor":
        return _stall_monitor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
