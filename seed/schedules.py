"""Learning-rate schedules, precomputed per step (one array, asserted length, as DINO does)."""

from __future__ import annotations

import math

import numpy as np


def warmup_cosine(base_lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: float) -> np.ndarray:
    """Linear warm-up from 0 for ``warmup_epochs`` (may be fractional), then cosine to 0: ``[epochs * steps]``."""
    total = epochs * steps_per_epoch
    warm = min(total, int(round(warmup_epochs * steps_per_epoch)))
    steps = np.arange(total, dtype=np.float64)
    lr = np.where(
        steps < warm,
        base_lr * (steps + 1) / max(warm, 1),
        0.5 * base_lr * (1 + np.cos(math.pi * (steps - warm) / max(total - warm, 1))),
    )
    assert len(lr) == total
    return lr
