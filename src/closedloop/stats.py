"""Accuracy with a percentile bootstrap confidence interval (SPEC §7), the paired exact
McNemar test of two models on the same questions, and the paired gain of a model over a
baseline across seeds and questions (two-level bootstrap)."""

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


def seed_summary(per_seed: dict[int, float]) -> dict:
    """Mean and sample standard deviation (ddof 1; 0 for one seed) of per-seed scores."""
    values = np.array(list(per_seed.values()), dtype=float)
    sd = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {"per_seed": dict(per_seed), "mean": float(values.mean()), "sd": sd, "n_seeds": int(values.size)}


def paired_gain_over_seeds(baseline: np.ndarray, model: np.ndarray, n_boot: int = 2000, level: float = 0.95,
                           seed: int = 0) -> dict:
    """Paired gain of ``model`` over ``baseline`` across seeds and questions, with a two-level
    percentile bootstrap interval (SPEC §7: held-out accuracy with intervals; here over seeds).

    Input: ``baseline`` and ``model`` are (S, Q) arrays of per-question scores in [0, 1] for
    S seeds and the same Q questions in the same order (seed s of the model is compared with
    seed s of the baseline: each seed's loop starts from its own SFT model).

    Method:
      1. d[s, q] = model[s, q] − baseline[s, q]; the gain is the mean of d over all s, q
         (= mean over seeds of each seed's accuracy difference).
      2. For b = 1..B: draw S seeds with replacement, then Q questions with replacement; the
         one question draw is used for every drawn seed, because every seed answers the same
         questions (seeds and questions are crossed, not nested). g_b = mean of d over the
         drawn (seed, question) cells.
      3. The interval is the (1 − level)/2 and (1 + level)/2 quantiles of g_1..g_B
         (``numpy.quantile``, linear interpolation).
    Both sources of variation count: a loop that helps on one seed only gets a wide interval
    (seed level), and so does a gain carried by a few questions (question level). With S = 1 it
    is the ordinary paired bootstrap over questions.

    Returns the gain, its interval, the per-seed gains and the questions gained and lost
    summed over seeds.
    """
    base, mod = np.asarray(baseline, dtype=float), np.asarray(model, dtype=float)
    if base.shape != mod.shape or base.ndim != 2:
        raise ValueError(f"expected two (seeds, questions) arrays of one shape, got {base.shape} and {mod.shape}")
    d = mod - base
    n_seeds, n_q = d.shape
    rng = np.random.default_rng(seed)
    seeds_idx = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    q_idx = rng.integers(0, n_q, size=(n_boot, n_q))
    per_seed_q = d[seeds_idx]  # (B, S, Q)
    draws = np.take_along_axis(per_seed_q, q_idx[:, None, :].repeat(n_seeds, axis=1), axis=2).mean(axis=(1, 2))
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return {"gain": float(d.mean()), "ci_low": float(low), "ci_high": float(high), "ci_level": level,
            "per_seed": [float(x) for x in d.mean(axis=1)], "gained": int((d > 0).sum()),
            "lost": int((d < 0).sum()), "n_seeds": int(n_seeds), "n_questions": int(n_q)}
