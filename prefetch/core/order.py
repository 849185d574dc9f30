"""The order of samples: which indices make up batch number ``b``.

Everything here is a pure function of the configuration, so any process (or a
resumed run) computes the same batches without talking to anyone, and nothing here
grows with the number of samples ``n``: a batch costs ``O(batch_size)`` time and memory
whether ``n`` is 10^3 or 10^12 (see docs/design.md, "Order and determinism"):

* epoch ``e``'s order maps each *position* ``p`` in ``[0, n)`` to a sample index, by a
  function evaluated for the positions a batch needs, never materialised:

  - ``shuffle=False``: the identity;
  - ``shuffle=True``: a bijection of ``[0, n)`` keyed by ``(seed, e)`` (``core.permutation``);
  - ``shuffle="block"``: the data is cut into blocks of ``block_size`` consecutive samples (the last
    one may be shorter); a bijection keyed by ``(seed, e)`` shuffles the blocks; the shuffled
    sequence is cut into windows of ``WINDOW_BLOCKS`` blocks, and a bijection keyed by
    ``(seed, e, window)`` shuffles the samples inside each window. A run of positions therefore
    reads from a few blocks at a time, and each batch still mixes several blocks;

* sharding keeps the first ``n - n % world_size`` positions of the epoch and deals them
  out round-robin, so rank ``r`` gets positions ``r, r + world_size, ...``. Every rank
  therefore sees ``n // world_size`` samples per epoch, disjoint from the other ranks';
  the ``n % world_size`` left-over samples are skipped for that epoch (a different few
  every epoch when shuffling);
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
from typing import Protocol

import numpy as np

from .permutation import keys_per_element, permute, round_keys, unpermute

LAST_BATCH_MODES = ("wrap", "short", "drop")
SHUFFLE_MODES = (True, False, "block")
# shuffle="block": samples per block, the unit read in one sequential run. 256 samples turn 256
# random reads into one run: 256 KiB of 1 KiB samples (twice Linux's default readahead), 32 MiB
# of 128 KiB images (enough to amortise an object store's ~10-100 ms to first byte). Larger
# blocks read faster and mix less: a block's samples all come within one window of the epoch.
DEFAULT_BLOCK_SIZE = 256
# Blocks per window: what a run of batches reads from at once, and what one batch mixes. 8 keeps a
# reader's working set at 8 blocks (2048 samples by default) while a batch of 32 holds ~4 samples
# of each of 8 blocks instead of 32 of one.
WINDOW_BLOCKS = 8
# Shard positions whose indices are computed at once and kept: one numpy pass over 4096 positions
# costs ~0.25 ms, what 3-4 passes over a batch of 32 cost (each numpy call has a fixed cost of ~0.5 us,
# and a pass makes ~110), so a batch of 32 costs ~2 us of it instead of ~75 us. 32 KiB each.
CHUNK_SAMPLES = 4096
# Chunks kept per Order: a batch within one epoch spans at most two (when batch_size <= CHUNK_SAMPLES),
# and one that straddles an epoch boundary takes the end of one epoch and the start of the next.
_CACHED_CHUNKS = 4
# Epoch orders kept per Order (a few keys each): two cover a batch that straddles an epoch boundary.
_CACHED_EPOCHS = 2
# Salts that keep the three bijections of an epoch apart (any distinct constants do).
_SAMPLES_SALT, _BLOCKS_SALT, _WINDOWS_SALT = 0x5A3D, 0xB10C, 0x3D0E


class EpochOrder(Protocol):
    """One epoch's order: ``indices(positions)`` gives the sample at each position (``uint64`` in, ``int64`` out)."""

    def indices(self, positions: np.ndarray) -> np.ndarray: ...


class _Identity:
    def indices(self, positions: np.ndarray) -> np.ndarray:
        return positions.astype(np.int64)


class _Shuffled:
    """``shuffle=True``: one bijection of ``[0, n)``."""

    def __init__(self, seed: int, epoch: int, n: int):
        self.n = n
        self.keys = round_keys(seed, epoch, _SAMPLES_SALT)

    def indices(self, positions: np.ndarray) -> np.ndarray:
        return permute(positions, self.n, self.keys).astype(np.int64)


class _Blocks:
    """``shuffle="block"``: blocks shuffled, then samples shuffled within windows of ``WINDOW_BLOCKS`` blocks.

    *Slot* ``t`` of the epoch holds block ``permute(t)``; all blocks have ``block_size`` samples but
    the last, which may be shorter and sits at slot ``partial``, so a slot starts at ``t * k`` up to
    ``partial`` and ``short`` samples earlier after it. Window ``j`` is slots ``[j * W, j * W + W)``."""

    def __init__(self, seed: int, epoch: int, n: int, block_size: int):
        self.k = np.uint64(block_size)
        self.blocks = -(-n // block_size)
        self.block_keys = round_keys(seed, epoch, _BLOCKS_SALT)
        self.window_keys = round_keys(seed, epoch, _WINDOWS_SALT)
        last = n - (self.blocks - 1) * block_size  # samples of the last block, 1 .. block_size
        self.short = np.uint64(block_size - last)
        last_block = np.array([self.blocks - 1], dtype=np.uint64)
        self.partial = unpermute(last_block, self.blocks, self.block_keys)[0]
        self.partial_end = self.partial * self.k + np.uint64(last)  # the position after the partial block

    def _start(self, slot: np.ndarray) -> np.ndarray:
        """The first position of each slot (``blocks`` gives ``n``)."""
        return slot * self.k - self.short * (slot > self.partial)

    def _slot(self, positions: np.ndarray) -> np.ndarray:
        """The slot that holds each position."""
        return np.where(positions < self.partial_end, positions // self.k, (positions + self.short) // self.k)

    def indices(self, positions: np.ndarray) -> np.ndarray:
        window = self._slot(positions) // np.uint64(WINDOW_BLOCKS)
        first_slot = window * np.uint64(WINDOW_BLOCKS)
        begin = self._start(first_slot)
        end = self._start(np.minimum(first_slot + np.uint64(WINDOW_BLOCKS), np.uint64(self.blocks)))
        keys = keys_per_element(self.window_keys, window)
        moved = begin + permute(positions - begin, end - begin, keys)  # shuffled within its window
        slot = self._slot(moved)
        block = permute(slot, self.blocks, self.block_keys)
        return (block * self.k + (moved - self._start(slot))).astype(np.int64)


def epoch_order(seed: int, epoch: int, n: int, shuffle: bool | str, block_size: int) -> EpochOrder:
    """Epoch ``epoch``'s order of ``range(n)``: a pure function of ``(seed, epoch)`` and the options."""
    if shuffle == "block":
        return _Blocks(seed, epoch, n, block_size)
    return _Shuffled(seed, epoch, n) if shuffle else _Identity()


@dataclass(frozen=True)
class Order:
    """The batch plan of one loader: ``batch_indices(b)`` for every batch number ``b``.

    ``epochs=None`` means an endless stream. ``block_size`` is used by ``shuffle="block"`` only.
    """

    n: int
    batch_size: int
    seed: int
    shuffle: bool | str = True
    epochs: int | None = None
    last_batch: str = "wrap"
    rank: int = 0
    world_size: int = 1
    block_size: int = DEFAULT_BLOCK_SIZE
    _epochs: dict[int, EpochOrder] = field(default_factory=dict, init=False, repr=False, compare=False)
    _chunks: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

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

    def epoch_order(self, epoch: int) -> EpochOrder:
        """Epoch ``epoch``'s order of all ``n`` samples (before sharding)."""
        found = self._epochs.get(epoch)
        if found is None:
            found = epoch_order(self.seed, epoch, self.n, self.shuffle, self.block_size)
            if len(self._epochs) >= _CACHED_EPOCHS:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = found
        return found

    def _positions(self, start: int, stop: int) -> np.ndarray:
        """The epoch positions of this rank's shard positions ``[start, stop)``."""
        return np.arange(start, stop, dtype=np.uint64) * np.uint64(self.world_size) + np.uint64(self.rank)

    def _chunk(self, epoch: int, number: int) -> np.ndarray:
        """This rank's indices of shard positions ``[number * CHUNK_SAMPLES, ...)`` of ``epoch`` (kept, read-only)."""
        chunk = self._chunks.get((epoch, number))
        if chunk is None:
            start = number * CHUNK_SAMPLES
            positions = self._positions(start, min(start + CHUNK_SAMPLES, self.shard_size))
            chunk = self.epoch_order(epoch).indices(positions)
            chunk.flags.writeable = False  # batches are views of it: nobody may change the cache
            if len(self._chunks) >= _CACHED_CHUNKS:
                self._chunks.pop(next(iter(self._chunks)))  # the oldest
            self._chunks[(epoch, number)] = chunk
        return chunk

    def shard_indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """This rank's indices for shard positions ``[start, stop)`` of ``epoch``, in order (int64;
        ``0 <= start <= stop <= shard_size``). ``O(stop - start + CHUNK_SAMPLES)``."""
        if not self.shuffle:  # the identity: the positions themselves, in one numpy call
            ws, rank = self.world_size, self.rank
            return np.arange(start * ws + rank, stop * ws + rank, ws, dtype=np.int64)
        parts = []
        while start < stop:
            number, offset = divmod(start, CHUNK_SAMPLES)
            take = min(stop - start, CHUNK_SAMPLES - offset)
            parts.append(self._chunk(epoch, number)[offset : offset + take])
            start += take
        if not parts:
            return np.empty(0, dtype=np.int64)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

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
            return self.shard_indices(epoch, j * bs, min((j + 1) * bs, m))
        start = b * bs
        stop = start + bs
        parts = []
        while start < stop:
            epoch, offset = divmod(start, m)
            take = min(stop - start, m - offset)
            parts.append(self.shard_indices(epoch, offset, offset + take))
            start += take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
