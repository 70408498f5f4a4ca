"""SPEC §2 arithmetic on a hand-built tree: PUCT choice, backup, commit, pairs, α."""

import math
import random

import pytest

from closedloop.loop.tree import Candidate, Tree, alpha, length_normalised_prior, node_value, preference_pairs


def cand(text, prior, c, terminal=False, correct=None):
    return Candidate(text, prior, c, terminal, correct, n_tokens=3)


@pytest.fixture
def tree():
    """root → a (C .6, p .5), b (C .3, p .3); a → c (C .9, correct), d (C .2, wrong), both terminal."""
    t = Tree()
    t.add_children(0, [cand("a", 0.5, 0.6), cand("b", 0.3, 0.3)], max_children=4)
    t.backup([0])  # the simulation that expanded the root
    return t


def test_new_children_start_with_q_equal_to_the_step_reward(tree):
    a, b = tree[1], tree[2]
    assert (a.value, a.reward, a.q, a.v) == (0.6, 0.6, 0.6, 0.0)
    assert (b.value, b.reward, b.q) == (0.3, 0.3, 0.3)
    assert tree.root.visits == 1 and tree.root.v == pytest.approx(0.45)  # mean Q of the fresh children


def test_puct_selection_and_backup_by_hand(tree):
    # N(root)=1: a: .6 + 1·.5·1/1 = 1.1 ; b: .3 + .3 = .6
    assert tree.puct(tree.root, tree[1], 1.0) == pytest.approx(1.1)
    assert tree.select(0, 1.0) == [0, 1]
    tree.add_children(1, [cand("c", 0.4, 0.9, True, True), cand("d", 0.6, 0.2, True, False)], max_children=4)
    c, d = tree[3], tree[4]
    assert c.value == pytest.approx(1.9) and c.reward == pytest.approx(1.3)  # C + O, minus v(a)
    assert d.value == pytest.approx(-0.8) and d.reward == pytest.approx(-1.4)
    tree.backup([0, 1])
    assert tree[1].v == pytest.approx(-0.05)  # mean(1.3, −1.4)
    assert tree[1].q == pytest.approx(0.55)  # r + γV = .6 − .05
    assert tree.root.v == pytest.approx(0.55) and tree.root.visits == 2 and tree[1].visits == 1
    # N(root)=2: a: .55 + .5·√2/2 = .9036 ; b: .3 + .3·√2 = .7243 → a; then c: 1.3 + .4 = 1.7 ; d: −1.4 + .6 → c
    assert tree.puct(tree.root, tree[1], 1.0) == pytest.approx(0.55 + 0.5 * math.sqrt(2) / 2)
    assert tree.puct(tree.root, tree[2], 1.0) == pytest.approx(0.3 + 0.3 * math.sqrt(2))
    assert tree.select(0, 1.0) == [0, 1, 3]
    tree.backup([0, 1, 3])
    assert tree[3].visits == 1 and tree[3].q == pytest.approx(1.3)
    assert tree[1].v == pytest.approx(1.3)  # only c visited: Σ N·Q / Σ N
    assert tree[1].q == pytest.approx(1.9) and tree.root.v == pytest.approx(1.9)
    assert tree.best_child(0) == 1 and tree.best_child(1) == 3
    assert tree.steps(3) == ["a", "c"]


def test_gamma_discounts_the_lookahead(tree):
    tree.add_children(1, [cand("c", 0.4, 0.9, True, True), cand("d", 0.6, 0.2, True, False)], max_children=4)
    tree.backup([0, 1], gamma=0.5)
    assert tree[1].q == pytest.approx(0.6 + 0.5 * -0.05)


def test_pairs_along_the_committed_path(tree):
    tree.add_children(1, [cand("c", 0.4, 0.9, True, True), cand("d", 0.6, 0.2, True, False)], max_children=4)
    tree.backup([0, 1])
    tree.backup([0, 1, 3])
    pairs = preference_pairs(tree, [0, 1, 3])
    assert [(p["chosen"], p["rejected"], p["depth"]) for p in pairs] == [("a", "b", 0), ("c", "d", 1)]
    first = pairs[0]
    assert (first["q_chosen"], first["q_rejected"]) == (pytest.approx(1.9), pytest.approx(0.3))
    assert (first["n_chosen"], first["n_rejected"], first["alpha"]) == (2, 0, 0.0)


def test_equal_q_siblings_give_no_pair():
    t = Tree()
    t.add_children(0, [cand("u", 0.5, 0.7), cand("v", 0.5, 0.7)], 4)
    assert preference_pairs(t, [0]) == []


def test_dpo_margin_keeps_pairs_with_a_clear_q_gap(tree):
    from closedloop.loop.pairs import confident_pairs

    tree.add_children(1, [cand("c", 0.4, 0.9, True, True), cand("d", 0.6, 0.2, True, False)], max_children=4)
    tree.backup([0, 1])
    tree.backup([0, 1, 3])
    pairs = preference_pairs(tree, [0, 1, 3])
    # Q gaps: a − b = 1.9 − 0.3 = 1.6 ; c − d = 1.3 − (−1.4) = 2.7
    assert confident_pairs(pairs, 0.0) == pairs and len(confident_pairs(pairs, 1.5)) == 2
    assert [p["chosen"] for p in confident_pairs(pairs, 1.6)] == ["c"]
    assert confident_pairs(pairs, 2.7) == []
    unsearched = [{"prompt": "p", "chosen": "x", "rejected": "y"}]  # instance-level pairs have no Q
    assert confident_pairs(unsearched, 5.0) == unsearched


def test_random_rejection_picks_a_non_best_sibling():
    t = Tree()
    t.add_children(0, [cand(x, 0.5, c) for x, c in (("w", 0.9), ("x", 0.5), ("y", 0.4), ("z", 0.1))], 4)
    seen = {preference_pairs(t, [0], "random", random.Random(s))[0]["rejected"] for s in range(40)}
    assert seen == {"x", "y", "z"}
    assert preference_pairs(t, [0])[0]["rejected"] == "z"


def test_deduplication_and_child_cap():
    t = Tree()
    new = t.add_children(0, [cand("s", .5, .5), cand(" s ", .5, .4), cand("", .5, .5)] +
                         [cand(f"x{i}", .5, .5) for i in range(5)], max_children=4)
    assert [t[i].text for i in new] == ["s", "x0", "x1", "x2"]


@pytest.mark.parametrize("n_w,n_l,expected", [(3, 1, 0.25), (1, 3, 0.5), (2, 2, 0.5), (4, 0, 0.0), (0, 0, 0.5),
                                              (7, 3, 0.3)])
def test_alpha(n_w, n_l, expected):
    assert alpha(n_w, n_l) == pytest.approx(expected)


def test_length_normalised_prior_and_value():
    assert length_normalised_prior(-2.0, 4, 1.25) == pytest.approx(math.exp(-2.0 / 4 ** 1.25))
    assert length_normalised_prior(-2.0, 4, 1.25) == pytest.approx(0.702189, abs=1e-6)  # 4^1.25 = 5.65685; exp(−0.353553)
    assert node_value(0.7, False, None, 2) == 0.7
    assert node_value(0.7, True, True, 2) == pytest.approx(1.7)
    assert node_value(0.7, True, False, 2) == pytest.approx(-0.3)
    assert node_value(0.8, False, None, 5, depth_scaled=True) == pytest.approx(0.4)  # C / max(5 − 3, 1)
