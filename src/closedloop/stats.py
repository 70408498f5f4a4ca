"""Accuracy with a percentile bootstrap confidence interval (SPEC §7), and the paired
exact McNemar test of two models on the same questions."""

from __future__ import annotations

import math

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


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: under "no difference" each of the ``gained + lost``
    questions the two models disagree on is a fair coin, so p = min(1, 2·P(X ≤ min(gained,
    lost))) with X ~ Binomial(gained + lost, 1/2)."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_change(before: dict[str, bool], after: dict[str, bool]) -> dict:
    """Questions (by id, both models answered them) that ``after`` gets right and ``before``
    wrong (gained) and the reverse (lost), with the exact McNemar p-value."""
    common = before.keys() & after.keys()
    gained = sum(after[i] and not before[i] for i in common)
    lost = sum(before[i] and not after[i] for i in common)
    return {"n": len(common), "gained": gained, "lost": lost, "p": mcnemar_exact(gained, lost)}
