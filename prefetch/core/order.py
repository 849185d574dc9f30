"""The order of samples: which indices make up batch number ``b``.

Everything here is a pure function of the configuration, so any process (or a
resumed run) computes the same batches without talking to anyone:

* epoch ``e``'s permutation is ``numpy.random.default_rng([seed, e]).permutation(n)``
  (the identity when ``shuffle`` is off);
* sharding keeps the first ``n - n % world_size`` entries of that permutation and
  deals them out round-robin, so rank ``r`` gets entries ``r, r + world_size, ...``.
  Every rank therefore sees ``n // world_size`` samples per epoch, disjoint from the
  other ranks'; the ``n % world_size`` left-over samples are skipped for that epoch
  (a different few every epoch when shuffling);
* the shard is cut into batches by ``last_batch``:

  - ``"wrap"``: the epochs form one continuous stream and every batch takes the
    next ``batch_size`` samples of it, so a batch may straddle an epoch boundary
    (the seed generator's behaviour). Every batch is full, a finite stream too;
  - ``"short"``: each epoch ends with a short batch if ``batch_size`` does not
    divide the shard;
  - ``"drop"``: an incomplete last batch of each epoch is dropped.

An epoch of the loop is ``steps_per_epoch`` batches, and epoch ``k`` is batches
``[k * steps_per_epoch, (k + 1) * steps_per_epoch)``, in every mode. With ``"wrap"``
that is ``ceil(shard / batch_size)`` full batches of the continuous stream, so a
finite stream of ``epochs`` loop epochs takes up to ``epochs * (batch_size - 1)``
samples of the data epochs after the last (their boundaries drift against the loop's,
as with the seed generator and Keras); with ``"short"`` and ``"drop"`` a loop epoch is
a data epoch. See docs/design.md ("Epochs").

Batch numbers count from 0 over the whole stream (all epochs), which is what the
engine dispatches, reorders and resumes by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

LAST_BATCH_MODES = ("wrap", "short", "drop")
# Epoch shards kept per Order; two cover a batch that straddles an epoch boundary.
_CACHED_EPOCHS = 2


def epoch_permutation(seed: int, epoch: int, n: int, shuffle: bool = True) -> np.ndarray:
    """Return epoch ``epoch``'s order of ``range(n)``: a pure function of ``(seed, epoch)``."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64, copy=False)


@dataclass(frozen=True)
class Order:
    """The batch plan of one loader: ``batch_indices(b)`` for every batch number ``b``.

    ``epochs=None`` means an endless stream.
    """

    n: int
    batch_size: int
    seed: int
    shuffle: bool = True
    epochs: int | None = None
    last_batch: str = "wrap"
    rank: int = 0
    world_size: int = 1
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def shard_size(self) -> int:
        """Samples this rank sees per epoch."""
        return self.n // self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Batches that cover one epoch of this rank's shard (``drop``: full batches only)."""
        if self.last_batch == "drop":
            return self.shard_size // self.batch_size
        return math.ceil(self.shard_size / self.batch_size)

    @property
    def num_batches(self) -> int | None:
        """Batches in the whole stream (``epochs * steps_per_epoch``), or ``None`` when it is endless."""
        if self.epochs is None:
            return None
        return self.epochs * self.steps_per_epoch

    def epoch_end(self, b: int) -> int:
        """The first batch number after the loop epoch that batch ``b`` belongs to."""
        return (b // self.steps_per_epoch + 1) * self.steps_per_epoch

    def epoch_shard(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch``, in order."""
        shard = self._cache.get(epoch)
        if shard is None:
            perm = epoch_permutation(self.seed, epoch, self.n, self.shuffle)
            shard = perm[: self.shard_size * self.world_size][self.rank :: self.world_size]
            shard.flags.writeable = False  # batches are views of it: nobody may change the cache
            if len(self._cache) >= _CACHED_EPOCHS:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = shard
        return shard

    def batch_length(self, b: int) -> int:
        """How many samples batch ``b`` has (without computing them)."""
        if self.last_batch == "wrap":
            return self.batch_size
        j = b % self.steps_per_epoch
        return min(self.batch_size, self.shard_size - j * self.batch_size)

    def batch_indices(self, b: int) -> np.ndarray:
        """The sample indices of batch ``b`` (int64), or ``IndexError`` past the end."""
        total = self.num_batches
        if b < 0 or (total is not None and b >= total) or self.steps_per_epoch == 0:
            raise IndexError(f"batch {b} is outside the stream of {total} batches")
        m, bs = self.shard_size, self.batch_size
        if self.last_batch != "wrap":
            epoch, j = divmod(b, self.steps_per_epoch)
            return self.epoch_shard(epoch)[j * bs : (j + 1) * bs]
        start = b * bs
        stop = start + bs
        parts = []
        while start < stop:
            epoch, offset = divmod(start, m)
            take = min(stop - start, m - offset)
            parts.append(self.epoch_shard(epoch)[offset : offset + take])
            start += take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
