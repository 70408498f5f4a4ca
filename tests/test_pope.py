"""POPE scoring (SPEC §4): the answer rule on tricky answers, metrics against hand-computed
confusion matrices, and bootstrap CIs of F1."""

import math

import pytest

from closedloop import stats
from closedloop.vlm import pope


@pytest.mark.parametrize("text,expected", [
    ("No, there is not.", "no"),
    ("Yes.", "yes"),
    ("There is no circle", "no"),
    ("There is not a circle in the image.", "no"),
    ("yes, there is a red circle. No other shapes.", "yes"),  # only the first sentence counts
    ("NO", "yes"),  # the official rule matches the exact words No / no / not only
    ("Nothing else. There is no triangle.", "yes"),  # "nothing" is not the word "no"
    ("  yes .  ", "yes"),
    ("no .", "no"),  # the word-level tokenizer's decoding
    ("Not sure", "yes"),  # "Not" is not "not"
    ("No\nthere is none", "yes"),  # split on single spaces only: the word is "No\nthere"
    ("no!", "yes"),
    ("", "yes"),  # POPE's rule: anything without no/not is a yes
])
def test_official_answer_rule(text, expected):
    """POPE's evaluate.py (AoiDragon/POPE f3ec604) / LLaVA eval_pope.py on tricky answers."""
    assert pope.parse_answer(text) == expected
    assert pope.parse_answer(text, "official") == expected


@pytest.mark.parametrize("text,expected", [
    ("NO", "no"), ("Not sure", "no"), ("No\nthere is none", "no"), ("no!", "no"),
    ("Nothing else. There is no triangle.", "yes"), ("", "yes"),
])
def test_lenient_answer_rule(text, expected):
    assert pope.parse_answer(text, "lenient") == expected


def test_unknown_answer_rule_names_the_key():
    with pytest.raises(ValueError, match="vlm.pope.answer_rule"):
        pope.parse_answer("yes", "strict")


def test_metrics_match_a_hand_computed_confusion_matrix():
    labels = ["yes"] * 6 + ["no"] * 4
    answers = ["yes", "yes", "yes", "yes", "no", "no",  # 4 TP, 2 FN
               "yes", "no", "no", "no"]  # 1 FP, 3 TN
    c = pope.confusion(labels, answers)
    assert c == {"tp": 4, "fp": 1, "tn": 3, "fn": 2}
    m = pope.metrics_from_confusion(c)
    precision, recall = 4 / 5, 4 / 6
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(precision)
    assert m["recall"] == pytest.approx(recall)
    assert m["f1"] == pytest.approx(2 * precision * recall / (precision + recall))  # 0.7273
    assert m["yes_ratio"] == pytest.approx(5 / 10)


def test_all_no_answers_give_zero_precision_recall_f1():
    m = pope.metrics_from_confusion(pope.confusion(["yes", "no", "no"], ["no", "no", "no"]))
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_score_on_generations_and_bootstrap_ci():
    labels = ["yes", "no"] * 20
    generations = ["Yes."] * 40  # always yes: POPE's degenerate case
    answers = [pope.parse_answer(g) for g in generations]
    s = pope.score(labels, answers, n_boot=300, level=0.9, seed=0)
    assert s["confusion"] == {"tp": 20, "fp": 20, "tn": 0, "fn": 0}
    assert s["f1"] == pytest.approx(2 / 3) and s["yes_ratio"] == 1.0 and s["recall"] == 1.0
    low, high = s["ci"]["f1"]
    assert low < s["f1"] < high and high - low < 0.3
    assert s["ci"]["yes_ratio"] == [1.0, 1.0]


def test_bootstrap_metric_agrees_with_the_mean_bootstrap():
    scores = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1]
    import numpy as np

    arr = np.array(scores, dtype=float)
    ci = stats.bootstrap_metric(lambda idx: {"mean": arr[idx].mean(1)}, len(scores), ["mean"], 500, 0.95, 3)
    assert ci["mean"] == pytest.approx(stats.bootstrap_ci(scores, 500, 0.95, 3))
    assert all(math.isnan(v) for v in stats.bootstrap_metric(lambda idx: {}, 0, ["f1"])["f1"])
