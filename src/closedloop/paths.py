"""Where every artifact lives. Snakemake rules and stage code share these functions,
so the DAG and the stages can never disagree about a path."""

from __future__ import annotations

from pathlib import Path


def data_dir(cfg, task: str) -> Path:
    """``data/<experiment>/<task>/``: train.jsonl (when the task has one), heldout.jsonl."""
    return Path(cfg.data_dir) / cfg.experiment / task


def run_dir(cfg) -> Path:
    return Path(cfg.results_dir) / cfg.experiment


def sft_dir(cfg) -> Path:
    """``results/<experiment>/sft/``: model/ (from_pretrained dir), train_log.csv."""
    return run_dir(cfg) / "sft"


def model_dir(cfg, tag: str) -> Path | None:
    """The from_pretrained dir of a trained model tag; ``None`` for the base model."""
    if tag == "base":
        return None
    if tag == "sft":
        return sft_dir(cfg) / "model"
    raise ValueError(f"unknown model tag {tag!r} (expected 'base' or 'sft')")


def policy_dir(cfg, k: int) -> Path:
    """policy_k's from_pretrained dir: policy_0 is the SFT model (SPEC §3)."""
    if k == 0:
        return sft_dir(cfg) / "model"
    return run_dir(cfg) / f"iter{k}" / "dpo" / "model"


def mcts_dir(cfg, k: int) -> Path:
    """``results/<experiment>/iter<k>/mcts/``: shards/<i>/ and merged/ (trees.jsonl, pairs.jsonl)."""
    return run_dir(cfg) / f"iter{k}" / "mcts"


def mcts_shard_dir(cfg, k: int, shard: int) -> Path:
    return mcts_dir(cfg, k) / "shards" / str(shard)


def eval_dir(cfg, model: str, task: str) -> Path:
    """``results/<experiment>/eval/<model>/<task>/``: predictions.jsonl, metrics.json."""
    return run_dir(cfg) / "eval" / model / task


def report_file(cfg) -> Path:
    return run_dir(cfg) / "report.md"


def plots_dir(cfg) -> Path:
    return run_dir(cfg) / "plots"
