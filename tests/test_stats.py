"""The percentile bootstrap CI (SPEC §7)."""

import numpy as np
import pytest

from closedloop import stats


def test_constant_scores_give_a_degenerate_interval():
    assert stats.bootstrap_ci([1, 1, 1, 1]) == (1.0, 1.0)
    assert stats.bootstrap_ci([0, 0, 0]) == (0.0, 0.0)


def test_interval_matches_a_hand_rolled_bootstrap():
    scores = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 1], dtype=float)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 10, size=(500, 10))
    means = scores[idx].mean(axis=1)
    expected = tuple(np.quantile(means, [0.05, 0.95]))
    assert stats.bootstrap_ci(scores, n_boot=500, level=0.90, seed=7) == pytest.approx(expected)


def test_interval_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.random(50) < 0.6
    large = rng.random(2000) < 0.6
    lo_s, hi_s = stats.bootstrap_ci(small)
    lo_l, hi_l = stats.bootstrap_ci(large)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3
    # binomial standard error check: width ≈ 2·1.96·sqrt(p(1-p)/n)
    assert hi_l - lo_l == pytest.approx(2 * 1.96 * np.sqrt(0.24 / 2000), rel=0.15)


def test_summarise_reports_accuracy_n_and_level():
    out = stats.summarise([1, 0, 1, 0], n_boot=100, level=0.95, seed=0)
    assert out["accuracy"] == 0.5 and out["n"] == 4 and out["ci_level"] == 0.95
    assert 0.0 <= out["ci_low"] <= 0.5 <= out["ci_high"] <= 1.0


@pytest.mark.parametrize(("gained", "lost", "p"), [
    (10, 5, 2 * (1 + 15 + 105 + 455 + 1365 + 3003) / 2 ** 15),  # 0.3018
    (18, 5, 2 * (1 + 23 + 253 + 1771 + 8855 + 33649) / 2 ** 23),  # 0.0106
    (0, 6, 2 / 2 ** 6),
    (5, 5, 1.0),  # 2·P(X ≤ 5) > 1 for n = 10: capped
    (0, 0, 1.0),
])
def test_exact_mcnemar_against_hand_computed_binomial_tails(gained, lost, p):
    assert stats.mcnemar_exact(gained, lost) == pytest.approx(p, rel=1e-12)
    assert stats.mcnemar_exact(lost, gained) == pytest.approx(p, rel=1e-12)  # two-sided


def test_paired_change_counts_discordant_questions_by_id():
    before = {"a": True, "b": False, "c": False, "d": True, "e": True}
    after = {"a": True, "b": True, "c": True, "d": False, "f": True}  # "e" and "f" not shared
    assert stats.paired_change(before, after) == {"n": 4, "gained": 2, "lost": 1, "p": 1.0}
