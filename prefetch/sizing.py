"""The default ``prefetch`` within the byte budget: the configuration's side of ``_budget``.

``_budget`` reads the machine (free ``/dev/shm``, available memory) and finds the deepest depth whose slots fit;
this module applies it to a ``LoaderConfig``: ``validation.make_config`` bounds a default depth with
``size_prefetch``, ``doctor`` compares a given one with ``byte_ceiling``. The sentences written here are the
provenance ``stats()`` and ``doctor`` show (``docs/design.md``, "Defaults from the real budget").
"""

from __future__ import annotations

from dataclasses import replace

from . import _budget
from .core.config import LoaderConfig


def size_prefetch(config: LoaderConfig) -> LoaderConfig:
    """The default depth (per worker), within the byte budget of ``/dev/shm`` and memory (``budget_prefetch``)."""
    workers_from, prefetch_from = config.provenance
    prefetch, prefetch_from = budget_prefetch(config, prefetch_from, _budget.shm_dir())
    return replace(config, prefetch=prefetch, provenance=(workers_from, prefetch_from))


def byte_ceiling(config: LoaderConfig, shm_dir: str) -> _budget.Ceiling | str:
    """The byte ceiling of ``config``'s depth (up to ``config.prefetch``) on this machine now, or why there is none."""
    if config.workers == 0:
        return "nothing is prefetched with workers=0"
    one = config.batch_bytes()
    if one is None:
        return "no byte bound: a batch's size is known only once one is made (the sources are not numpy arrays)"
    ceiling = _budget.prefetch_ceiling(
        one,
        lambda depth: replace(config, prefetch=depth).max_slots,
        config.prefetch,
        config.workers,
        _budget.shm_free(shm_dir),
        _budget.available_memory(),
        config.local_ranks,
    )
    if ceiling is None:
        return "no byte bound: /dev/shm and memory could not be read"
    guess = "" if config.exact_batch_size else " (the sources' size, before your transforms)"
    return _budget.Ceiling(ceiling.depth, ceiling.why + guess)


def budget_prefetch(config: LoaderConfig, default_why: str, shm_dir: str) -> tuple[int, str]:
    """The default ``prefetch`` of ``config`` (the per-worker depth, ``default_why``) under its byte ceiling,
    and where it came from."""
    ceiling = byte_ceiling(config, shm_dir)
    if isinstance(ceiling, str):
        return config.prefetch, f"prefetch={config.prefetch}: {default_why}; {ceiling}"
    if ceiling.depth < config.prefetch:
        return ceiling.depth, f"prefetch={ceiling.depth}: {ceiling.why}; {default_why} would be {config.prefetch}"
    return config.prefetch, f"prefetch={config.prefetch}: {default_why}; {ceiling.why}"
