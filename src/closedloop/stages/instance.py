"""Stage ``instance``: instance-level online preference pairs, the ablation of SPEC §3's
step-level loop (talk: instance-level online 78.3 vs step-level online 82.0 average).

For each of the MCTS prompts, sample ``loop.instance_samples`` full solutions from the
ablation's policy_{k−1}; when both exist, pair a correct solution (chosen) with an
incorrect one (rejected), α = 0. Same prompts, temperature and token budget as MCTS.
"""

from __future__ import annotations

import json
import random

from transformers import set_seed

from closedloop import artifacts, generation, models, paths, prompts
from closedloop import config as cl_config
from closedloop.loop.pairs import make_pairs

VARIANT = "instance_online"


def main(cfg) -> None:
    """Sample, grade and pair full solutions with the instance ablation's policy_{k−1}."""
    k = cfg.job.iteration
    if not k or k < 1:
        raise cl_config.ConfigError(f"key 'job.iteration': expected an integer >= 1, got {k}")
    rows = artifacts.read_jsonl(paths.data_dir(cfg, cfg.mcts.task) / "train.jsonl")[: cfg.mcts.n_prompts]
    policy = paths.policy_dir(cfg, k - 1, VARIANT)
    model, tokenizer = models.load_dir(policy, cfg.model, inference=True)
    set_seed(cfg.seed + k)
    texts = [prompts.chat_prompt(tokenizer, r) for r in rows]
    m = cfg.mcts
    solutions, n_tokens = generation.generate(
        model, tokenizer, texts, max_new_tokens=m.max_completion_tokens, batch_size=max(1, m.generate_batch_size
                                                                                         // cfg.loop.instance_samples),
        do_sample=True, temperature=m.temperature, top_p=m.top_p, num_return_sequences=cfg.loop.instance_samples,
        stop_at_answer=True, desc=f"instance pairs iter{k}")
    rng = random.Random(f"{cfg.seed}:{k}")
    pairs = [p for row, text, sols in zip(rows, texts, solutions, strict=True)
             for p in make_pairs(row, text, sols, rng, str(policy), k)]
    view = cl_config.stage_view(cfg, "instance", [cfg.mcts.task])
    inputs = {"data": paths.data_dir(cfg, cfg.mcts.task), "policy": policy}
    with artifacts.artifact_dir(paths.instance_dir(cfg, k), "instance", view, inputs, cfg.seed) as out:
        with open(out / "samples.jsonl", "w") as fh:
            artifacts.write_jsonl(fh, ({"id": r["id"], "solutions": s} for r, s in zip(rows, solutions, strict=True)))
        with open(out / "pairs.jsonl", "w") as fh:
            artifacts.write_jsonl(fh, pairs)
        (out / "stats.json").write_text(json.dumps({"prompts": len(rows), "pairs": len(pairs),
                                                    "policy_tokens": n_tokens}, indent=2) + "\n")
    print(f"instance: iter{k}: {len(pairs)} pairs from {len(rows)} prompts -> {paths.instance_dir(cfg, k)}")
