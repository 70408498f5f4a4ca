"""Self-evaluation guided stochastic beam search over reasoning steps (SPEC §1).

Every step, each of the k beams of every question proposes n candidate next steps (one
line each, sampled at temperature γ); a candidate's step score combines its
length-normalised generation probability P (geometric mean per token) and its
self-evaluation C (:mod:`closedloop.selfeval`, read from the generation's KV cache):
E_t = P^λ · C^(1−λ). A chain's score is the running product of its step scores
normalised by the number of steps (the geometric mean). From the k·n candidates of a
question, k are kept, sampled without replacement with probability ∝ exp(E/τ); τ decays
τ ← α·τ per step, and τ = 0 keeps the top k. All beams of all questions expand in one
``generate`` call per step, each question's prompt prefilled once for all its rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from closedloop import answers, prompts
from closedloop.generation import FINAL_ANSWER
from closedloop.prefix_cache import QuestionCache
from closedloop.sampling import sample_continuations


def step_score(sum_logprob: float, n_tokens: int, confidence: float, lam: float) -> float:
    """log E_t = λ·log P + (1−λ)·log C with P the per-token geometric mean probability."""
    log_p = sum_logprob / max(n_tokens, 1)
    return lam * log_p + (1 - lam) * math.log(max(confidence, 1e-12))


def chain_score(step_log_scores: list[float]) -> float:
    """E of a chain: the product of its step scores normalised by the number of steps,
    i.e. exp(mean log E_t)."""
    return math.exp(sum(step_log_scores) / len(step_log_scores)) if step_log_scores else 1.0


def sample_without_replacement(scores: list[float], k: int, tau: float, rng: np.random.Generator) -> list[int]:
    """k indices drawn without replacement with probability ∝ exp(score/τ) (successive
    sampling, by the Gumbel-top-k trick); τ = 0 returns the top k."""
    scores = np.asarray(scores, dtype=float)
    k = min(k, len(scores))
    if tau <= 0:
        return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]
    keys = scores / tau + rng.gumbel(size=len(scores))
    return [int(i) for i in np.argsort(-keys, kind="stable")[:k]]


@dataclass
class Beam:
    steps: list[str] = field(default_factory=list)
    log_scores: list[float] = field(default_factory=list)
    done: bool = False

    @property
    def score(self) -> float:
        return chain_score(self.log_scores)


def beam_search(model, tokenizer, rows: list[dict], *, k: int, n: int, lam: float, tau: float, tau_decay: float,
                max_steps: int, temperature: float, max_step_tokens: int, batch_size: int,
                seed: int = 0) -> tuple[list[str], int]:
    """The best chain per question (its steps joined by newlines) and the tokens generated."""
    rng = np.random.default_rng(seed)
    beams = [[Beam()] for _ in rows]  # one empty beam to start: its n candidates seed k beams
    generated = 0
    progress = tqdm(range(max_steps), desc="beam search", unit="step")
    for _ in progress:
        live = [(q, b) for q, qb in enumerate(beams) for b in qb if not b.done]
        if not live:
            break
        progress.set_postfix(live_beams=len(live), tokens=generated)
        contexts = [prompts.chat_prompt(tokenizer, rows[q]) + "".join(s + "\n" for s in b.steps)
                    for q, b in live for _ in range(n)]
        questions = [q for q, _ in live for _ in range(n)]
        samples = []
        for start in range(0, len(contexts), batch_size):
            samples += sample_continuations(model, tokenizer, contexts[start:start + batch_size],
                                            max_new_tokens=max_step_tokens, one_line=True,
                                            temperature=temperature, top_p=1.0, score=True,
                                            prefix=_question_cache(model, tokenizer, rows,
                                                                   questions[start:start + batch_size]))
        generated += sum(s.n_tokens for s in samples)
        candidates: dict[int, list[Beam]] = {q: [b for b in qb if b.done] for q, qb in enumerate(beams)}
        for (q, beam), group in zip(live, (samples[i:i + n] for i in range(0, len(samples), n)), strict=True):
            for s in group:
                if not s.text:
                    continue
                final = s.ended or bool(FINAL_ANSWER.search(s.text + "\n"))
                candidates[q].append(Beam(beam.steps + [s.text],
                                          beam.log_scores + [step_score(s.sum_logprob, s.n_tokens, s.confidence, lam)],
                                          final))
        for q, pool in candidates.items():
            if pool:
                keep = sample_without_replacement([c.score for c in pool], k, tau, rng)
                beams[q] = [pool[i] for i in keep]
        tau *= tau_decay
    best = [max(qb, key=lambda b: (b.done, b.score)) for qb in beams]
    return ["\n".join(b.steps) for b in best], generated


def _question_cache(model, tokenizer, rows: list[dict], questions: list[int]) -> tuple[QuestionCache, list[int]]:
    """The prompts of the questions in one generate batch, prefilled once for all their
    beams and candidates (:mod:`closedloop.prefix_cache`)."""
    unique = list(dict.fromkeys(questions))
    cache = QuestionCache(model, tokenizer, [prompts.chat_prompt(tokenizer, rows[q]) for q in unique])
    position = {q: i for i, q in enumerate(unique)}
    return cache, [position[q] for q in questions]


def majority_vote(completions: list[str], row: dict) -> str:
    """Self-consistency: the most frequent extracted answer among sampled solutions
    (ties: the earliest); returns one completion that gives it."""
    extracted = [answers.canonical(answers.extract(c, row)) for c in completions]
    counts: dict[str, int] = {}
    for e in extracted:
        if e is not None:
            counts[e] = counts.get(e, 0) + 1
    if not counts:
        return completions[0] if completions else ""
    top = max(counts, key=lambda e: (counts[e], -extracted.index(e)))
    return completions[extracted.index(top)]
