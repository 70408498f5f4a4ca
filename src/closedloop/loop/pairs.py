"""Preference pairs of the closed loop and its ablations (SPEC §3): which pairs train
(the Q-margin filter), whether α applies, TRL's preference dataset, and the
instance-level ablation's (correct, incorrect) pairs."""

from __future__ import annotations

import random

from datasets import Dataset

from closedloop import answers

ALPHA_FREE = ("plain_dpo", "instance_online")


def uses_alpha(d, variant: str) -> bool:
    return d.use_alpha and variant not in ALPHA_FREE


def confident_pairs(rows: list[dict], margin: float) -> list[dict]:
    """Pairs whose search values differ by more than ``margin`` (Q_w − Q_l > margin); pairs
    without Q values (instance-level ablation) are all kept."""
    if margin <= 0:
        return rows
    return [r for r in rows if "q_chosen" not in r or r["q_chosen"] - r["q_rejected"] > margin]


def preference_dataset(rows: list[dict], with_alpha: bool) -> Dataset:
    keep = ["prompt", "chosen", "rejected"] + (["alpha"] if with_alpha else [])
    return Dataset.from_list([{k: r[k] for k in keep} for r in rows])


def make_pairs(row: dict, prompt: str, solutions: list[str], rng: random.Random, policy: str, k: int) -> list[dict]:
    """At most one (correct, incorrect) pair per prompt, picked at random among each kind."""
    graded = [(s, answers.is_correct(answers.extract(s, row), row)) for s in solutions if s.strip()]
    good = [s for s, ok in graded if ok]
    bad = [s for s, ok in graded if not ok]
    if not good or not bad:
        return []
    return [{"prompt": prompt, "chosen": rng.choice(good), "rejected": rng.choice(bad), "q_chosen": 1.0,
             "q_rejected": -1.0, "n_chosen": None, "n_rejected": None, "alpha": 0.0, "depth": 0,
             "tree_id": f"iter{k}-{row['id']}", "policy": policy}]
