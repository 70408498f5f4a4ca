"""Stage ``evaluate``: model ``job.model`` on task ``job.task``'s ``eval.split`` split (SPEC §7,
:mod:`closedloop.evaluation`): predictions.jsonl and metrics.json with a bootstrap CI; multiple
choice by log-likelihood and GSM8K/MATH through lm-evaluation-harness unless configured otherwise."""

from __future__ import annotations

from closedloop import config as cl_config
from closedloop import paths
from closedloop.evaluation import evaluate, scoring, split_rows


def main(cfg) -> None:
    """Evaluate model ``cfg.job.model`` on task ``cfg.job.task``'s ``eval.split`` split."""
    tag, task = cfg.job.model, cfg.job.task
    if tag is None or task is None:
        raise cl_config.ConfigError("evaluate: keys 'job.model' and 'job.task' are required")
    rows = split_rows(cfg, task, cfg.eval)
    evaluate(cfg, tag, task, cfg.eval, rows, paths.eval_dir(cfg, tag, task),
             cl_config.stage_view(cfg, "evaluate", [task]), "evaluate", scoring(cfg, task, cfg.eval, rows))
