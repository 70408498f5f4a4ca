"""Self-evaluation guided beam search (SPEC §1): scores, τ = 0, sampling without
replacement, self-consistency, and a run on the tiny model."""

import math

import numpy as np
import pytest
import torch

from closedloop import beam, models


def test_step_score_by_hand():
    # P = exp(-2/4) per token, C = 0.8, λ = 0.5: log E = 0.5·(−0.5) + 0.5·log 0.8
    assert beam.step_score(-2.0, 4, 0.8, 0.5) == pytest.approx(-0.25 + 0.5 * math.log(0.8))
    assert beam.step_score(-2.0, 4, 0.8, 1.0) == pytest.approx(-0.5)  # λ = 1: generation only
    assert beam.step_score(-2.0, 4, 0.8, 0.0) == pytest.approx(math.log(0.8))  # λ = 0: self-evaluation only


def test_chain_score_is_the_step_normalised_product():
    steps = [math.log(0.9), math.log(0.4)]
    assert beam.chain_score(steps) == pytest.approx(math.sqrt(0.9 * 0.4))
    assert beam.chain_score([]) == 1.0


def test_tau_zero_is_deterministic_top_k():
    rng = np.random.default_rng(0)
    scores = [0.1, 0.9, 0.5, 0.7, 0.3]
    for _ in range(5):
        assert beam.sample_without_replacement(scores, 3, 0.0, rng) == [1, 3, 2]


def test_sampling_without_replacement_honours_the_probabilities():
    """First draw ~ softmax(E/τ); all draws distinct; chi-square at a fixed seed."""
    rng = np.random.default_rng(1234)
    scores, tau, trials = np.array([0.2, 0.5, 0.9, 0.1]), 0.25, 20000
    p = np.exp(scores / tau) / np.exp(scores / tau).sum()
    first = np.zeros(4)
    for _ in range(trials):
        picks = beam.sample_without_replacement(scores, 3, tau, rng)
        assert len(set(picks)) == 3
        first[picks[0]] += 1
    chi2 = (((first - trials * p) ** 2) / (trials * p)).sum()
    assert chi2 < 16.27  # 3 degrees of freedom, p = 0.001
    # the second draw follows the renormalised remainder: P(second = j | first = i) = p_j / (1 − p_i)
    rng = np.random.default_rng(99)
    pairs = [tuple(beam.sample_without_replacement(scores, 2, tau, rng)) for _ in range(trials)]
    after_top = [b for a, b in pairs if a == 2]
    rest = p.copy()
    rest[2] = 0
    rest /= rest.sum()
    observed = np.bincount(after_top, minlength=4) / len(after_top)
    assert observed == pytest.approx(rest, abs=0.03)


def test_majority_vote_normalises_answers():
    row = {"answer": "1234", "choices": None}
    sols = ["The answer is 7.", "The answer is 1,234.", "so The answer is 1234.0.", "The answer is 7."]
    assert beam.majority_vote(sols, row) == "The answer is 7."  # 7 ×2 vs 1234 ×2: earliest wins
    assert beam.majority_vote(sols + ["The answer is $1234"], row) == "The answer is 1,234."


@pytest.mark.slow
def test_beam_search_runs_on_the_tiny_model():
    from closedloop import config, synthetic

    cfg = config.load([], ["model.kind=tiny"])
    model, tok = models.load_base(cfg.model)
    rows = synthetic.generate("beam", 3, 2, 3, 20, 9)
    def run():
        torch.manual_seed(0)
        return beam.beam_search(model, tok, rows, k=2, n=2, lam=0.5, tau=0.5, tau_decay=0.5, max_steps=3,
                                temperature=1.0, max_step_tokens=8, batch_size=16, seed=0)

    out, tokens = run()
    assert len(out) == 3 and all(isinstance(s, str) and s for s in out)
    assert 0 < tokens <= 3 * (2 + 4 + 4) * 8  # questions × samples (1·n, then k·n per step) × tokens per step
    assert run() == (out, tokens)  # same seeds, same search
