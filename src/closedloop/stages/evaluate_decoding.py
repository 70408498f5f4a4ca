"""Stage ``evaluate_decoding``: one side of the matched-budget comparison of decodings
(SPEC §1: greedy vs self-consistency vs self-evaluation guided beam search)."""

from __future__ import annotations

from omegaconf import OmegaConf

from closedloop import config as cl_config
from closedloop import paths
from closedloop.evaluation import evaluate, split_rows


def main(cfg) -> None:
    """One decoding of ``decodings.methods`` on the first
    ``decodings.n_questions`` held-out questions, for the matched-budget comparison
    (SPEC §1); the generated tokens are counted in metrics.json."""
    tag, task, decoding = cfg.job.model, cfg.job.task, cfg.job.decoding
    if tag is None or task is None or decoding is None:
        raise cl_config.ConfigError("evaluate_decoding: keys 'job.model', 'job.task', 'job.decoding' are required")
    methods = [cl_config.enum_value(d) for d in cfg.decodings.methods]
    if decoding not in methods:
        raise cl_config.ConfigError(f"key 'job.decoding': expected one of decodings.methods {methods}, "
                                    f"got {decoding!r}")
    rows = split_rows(cfg, task, cfg.eval)
    rows = rows[: cfg.decodings.n_questions] if cfg.decodings.n_questions else rows
    d = cfg.decodings
    ev = OmegaConf.merge(cfg.eval, {"decoding": decoding, "k": d.samples, "beam_k": d.beam_k, "beam_n": d.beam_n})
    evaluate(cfg, tag, task, ev, rows, paths.decoding_eval_dir(cfg, tag, task, decoding),
             cl_config.stage_view(cfg, "evaluate_decoding", [task]), "evaluate_decoding")
