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


def bootstrap_metric(statistic, n: int, names, n_boot: int = 1000, level: float = 0.95,
                     seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of statistics that are not means (e.g. POPE's F1).

    ``statistic(idx)`` gets an ``(n_boot, n)`` array of resampled question indices and returns
    ``{name: array of n_boot values}``; the same resamples serve every name.
    """
    if n == 0:
        return {name: (float("nan"), float("nan")) for name in names}
    rng = np.random.default_rng(seed)
    values = statistic(rng.integers(0, n, size=(n_boot, n)))
    tail = (1.0 - level) / 2.0
    return {name: tuple(float(q) for q in np.quantile(values[name], [tail, 1.0 - tail])) for name in names}
