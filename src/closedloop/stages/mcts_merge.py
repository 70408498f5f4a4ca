"""Stage ``mcts_merge``: concatenate the shards of one MCTS iteration into one artifact
(trees.jsonl, pairs.jsonl) with the iteration's stats (pairs per tree, α distribution)."""

from __future__ import annotations

import json

from closedloop import artifacts, paths
from closedloop import config as cl_config
from closedloop.loop.search import describe_alpha


def main(cfg) -> None:
    """Concatenate the shards of iteration ``job.iteration`` of loop ``job.variant``."""
    k, variant = cfg.job.iteration or 1, cfg.job.variant
    shards = [paths.mcts_shard_dir(cfg, k, s, variant) for s in range(cfg.mcts.n_shards)]
    view = cl_config.stage_view(cfg, "mcts_merge", [cfg.mcts.task])
    inputs = {f"shard{s}": d for s, d in enumerate(shards)}
    with artifacts.artifact_dir(paths.mcts_dir(cfg, k, variant) / "merged", "mcts_merge", view, inputs,
                                cfg.seed) as out:
        for name in ("trees.jsonl", "pairs.jsonl"):
            with open(out / name, "w") as fh:
                for d in shards:
                    fh.write((d / name).read_text())
        records = artifacts.read_jsonl(out / "trees.jsonl")
        pairs = artifacts.read_jsonl(out / "pairs.jsonl")
        stats = {"trees": len(records), "pairs": len(pairs),
                 "pairs_per_tree": len(pairs) / max(len(records), 1),
                 "committed_accuracy": sum(r["correct"] for r in records) / max(len(records), 1),
                 "alpha": describe_alpha([p["alpha"] for p in pairs])}
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"mcts_merge: {paths.model_tag(k, variant)}: {stats['trees']} trees, {stats['pairs']} pairs")
