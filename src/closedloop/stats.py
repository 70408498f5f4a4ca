"""Accuracy with a percentile bootstrap confidence interval (SPEC §7)."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(scores, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-question ``scores`` (resampled questions)."""
    scores = np.asarray(scores, dtype=float)
    if scores.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, scores.size, size=(n_boot, scores.size))
    means = scores[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def summarise(scores, n_boot: int, level: float, seed: int) -> dict:
    low, high = bootstrap_ci(scores, n_boot, level, seed)
    return {"accuracy": float(np.mean(scores)) if len(scores) else float("nan"),
            "ci_low": low, "ci_high": high, "ci_level": level, "n": len(scores)}
