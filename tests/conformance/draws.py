"""The workload's transforms: every generator a transform may draw from, drawn from. Spawned workers and
Ray actors import this module by name; it imports no torch (``torchdraws`` adds torch's generator)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np

import prefetch


def draw_everywhere(sample: tuple[np.ndarray, Any]) -> tuple[np.ndarray, Any, np.ndarray]:
    """The sample, scaled by its draws, and one draw from ``random``, ``np.random`` and ``batch_rng()``."""
    x, label = sample
    draws = np.array([random.random(), np.random.rand(), prefetch.batch_rng().random()])
    return x * np.float32(draws.sum()), label, draws


def shift(batch: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """A ``batch_transform`` that draws from ``np.random``."""
    x, *rest = batch
    return (x + np.float32(np.random.randint(0, 100)), *rest)
