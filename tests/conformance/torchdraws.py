"""``draw_everywhere`` plus a draw from torch's global generator, where torch is installed.

torch is imported at the top, as user code does: a batch's torch draws are seeded only in a process
where torch is imported before the batch starts (docs/design.md, "torch only when already imported"),
and every process that unpickles this transform imports this module first. Importing torch costs a
spawned worker seconds: only the tests that need torch's draws use this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from draws import draw_everywhere

try:
    import torch
except ImportError:  # the draw from torch is left out where it is not installed
    torch = None


def draw_with_torch(sample: tuple[np.ndarray, Any]) -> tuple[np.ndarray, Any, np.ndarray]:
    """``draw_everywhere``'s sample and draws, and one more draw from torch (-1 without torch)."""
    x, label, draws = draw_everywhere(sample)
    extra = float(torch.rand(1)) if torch is not None else -1.0
    return x * np.float32(extra + 2.0), label, np.append(draws, extra)
