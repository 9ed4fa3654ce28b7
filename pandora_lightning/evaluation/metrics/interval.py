"""Confidence intervals for shares measured over episodes (percentile bootstrap, resampling episodes).

Rounds of one rollout are not independent (a model that loses the object in round 2 loses it in
round 3 too), so the unit resampled is the episode: the interval is the spread of the pooled share
over episode sets drawn with replacement.
"""
from __future__ import annotations

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


def bootstrap_interval(
    values: np.ndarray, episodes: np.ndarray, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile interval of ``values.mean()`` with whole episodes resampled.

    ``values``: (N,) per round (or frame) in [0, 1]; ``episodes``: (N,) the episode each belongs to.
    None when there is nothing to resample. The same inputs and seed give the same interval.
    """
    values, episodes = np.asarray(values, np.float64), np.asarray(episodes)
    if values.shape != episodes.shape:
        raise ValueError(f"values {values.shape} and episodes {episodes.shape} must have the same shape")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level={level} must be in (0, 1) and resamples={resamples} >= 1")
    if values.size == 0:
        return None
    _, index = np.unique(episodes, return_inverse=True)
    sums = np.bincount(index, weights=values)
    counts = np.bincount(index).astype(np.float64)
    draws = np.random.default_rng(seed).integers(len(sums), size=(resamples, len(sums)))
    shares = sums[draws].sum(1) / counts[draws].sum(1)
    lo, hi = np.quantile(shares, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
