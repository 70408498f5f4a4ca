"""Stage ``mcts``: search one iteration's prompts with policy_{k−1} (SPEC §2,
:mod:`closedloop.loop.search`) and write each shard's trees, step-level pairs and stats.

Each shard searches its prompts in batches of ``trees_per_batch`` trees. Completed batches
are written to a work dir keyed by the config hash and the inputs' provenance records
(:func:`closedloop.checkpoints.work_dir`: a changed policy or data never resumes old trees), so a killed shard resumes where it
stopped with identical results (each batch has its own seed, each request its own generator).
"""

from __future__ import annotations

import json
import shutil

import torch
from tqdm.auto import tqdm

from closedloop import artifacts, checkpoints, models, paths
from closedloop import config as cl_config
from closedloop.loop.search import (
    Searcher,
    batch_seed,
    keep_tree,
    pairs_from_record,
    shard_rows,
    shard_stats,
    tree_record,
)


def main(cfg) -> None:
    """Search shard ``job.shard`` of iteration ``job.iteration`` of loop ``job.variant``
    with that loop's policy_{k−1}."""
    shard, k, variant = cfg.job.shard, cfg.job.iteration or 1, cfg.job.variant
    if shard is None or not 0 <= shard < cfg.mcts.n_shards:
        raise cl_config.ConfigError(f"key 'job.shard': expected 0..{cfg.mcts.n_shards - 1}, got {shard}")
    policy_dir = paths.policy_dir(cfg, k - 1, variant)
    view = cl_config.stage_view(cfg, "mcts", [cfg.mcts.task])
    inputs = {"data": paths.data_dir(cfg, cfg.mcts.task), "policy": policy_dir}
    artifacts.check_inputs("mcts", inputs)  # before searching: never search with a changed policy
    # keyed by the config view and the inputs' records: never resumed from another policy's trees
    work = checkpoints.work_dir(paths.mcts_dir(cfg, k, variant) / "shard", view, inputs, prefix=f"shard{shard}")
    work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = models.load_dir(policy_dir, cfg.model, inference=True)
    searcher = Searcher(model, tokenizer, cfg.mcts, str(policy_dir))
    rows = shard_rows(cfg, shard)
    size = cfg.mcts.trees_per_batch
    batches = range(0, len(rows), size)
    # one tick per finished tree (a batch's trees finish at different times), not per batch
    progress = tqdm(total=len(rows), desc=f"mcts {paths.model_tag(k, variant)} shard{shard}", unit="tree")
    searcher.on_tree_done = lambda: progress.update(1)
    for b, start in enumerate(batches):
        done = work / f"batch{b:05d}.jsonl"
        if done.exists():
            progress.update(len(rows[start:start + size]))  # resumed: searched before the job stopped
            continue
        torch.manual_seed(batch_seed(cfg, k, shard, b))
        batch_rows = rows[start:start + size]
        results = searcher.search(batch_rows)
        with artifacts.atomic_file(done) as fh:
            artifacts.write_jsonl(fh, (tree_record(t, c, r, f"iter{k}-{r['id']}", str(policy_dir))
                                       for (t, c), r in zip(results, batch_rows, strict=True)))
    progress.close()
    records = [rec for b in range(len(batches)) for rec in artifacts.read_jsonl(work / f"batch{b:05d}.jsonl")]
    by_id = {r["id"]: r for r in rows}
    out_dir = paths.mcts_shard_dir(cfg, k, shard, variant)
    with artifacts.artifact_dir(out_dir, "mcts", view, inputs, cfg.seed) as out:
        with open(out / "trees.jsonl", "w") as fh:
            artifacts.write_jsonl(fh, records)
        with open(out / "pairs.jsonl", "w") as fh:
            artifacts.write_jsonl(fh, (p for rec in records if keep_tree(rec, cfg.mcts)
                                       for p in pairs_from_record(rec, by_id[rec["row_id"]], tokenizer,
                                                                  cfg.mcts, cfg.seed)))
        (out / "stats.json").write_text(json.dumps(shard_stats(records, out / "pairs.jsonl",
                                                               searcher.policy_tokens), indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"mcts: {paths.model_tag(k, variant)} shard{shard}: {len(records)} trees -> {out_dir}")
    if searcher.decode_steps:  # batches searched in this run (not resumed ones)
        phases = ", ".join(f"{key} {searcher.timings[key]:.1f} s" for key in ("decode", "prefill", "self_eval", "tree"))
        print(f"mcts: searched in {searcher.timings['total']:.1f} s ({phases}); {searcher.policy_tokens} policy tokens, "
              f"{searcher.decode_steps} decode steps, "
              f"{searcher.decode_row_steps / searcher.decode_steps:.1f} active rows per step")
