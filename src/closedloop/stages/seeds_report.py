"""Stage ``seeds_report``: the report over seeds (``seeds: [...]``, SPEC §7): per-seed accuracy
with mean ± sd, and each trained policy's paired gain over the SFT model of its seed with a
two-level bootstrap interval over seeds × questions (:mod:`closedloop.reporting`,
:func:`closedloop.stats.paired_gain_over_seeds`). Writes ``results/<experiment>/report.md``
and ``seeds.json``."""

from __future__ import annotations

import json

from closedloop import artifacts, dvc_store, paths
from closedloop import config as cl_config
from closedloop.reporting import render_seeds, seed_scores, seeds_aggregate


def main(cfg) -> None:
    """Aggregate the per-seed evaluations of ``cfg.seeds`` into one report."""
    if not cfg.seeds:
        raise cl_config.ConfigError("seeds_report: key 'seeds' is empty (expected e.g. [0, 1, 2])")
    started = artifacts.now()
    agg = seeds_aggregate(cfg, seed_scores(cfg), cfg.eval.n_bootstrap, cfg.eval.ci_level)
    md, run = paths.seeds_report_file(cfg), paths.experiment_dir(cfg)
    with artifacts.atomic_file(run / "seeds.json") as fh:
        fh.write(json.dumps(agg, indent=2) + "\n")
    with artifacts.atomic_file(md) as fh:
        fh.write(render_seeds(cfg, agg))
    inputs = {f"seed{s}/eval/{tag}/{task}": paths.eval_dir(paths.for_seed(cfg, s), tag, task) / "predictions.jsonl"
              for s in cfg.seeds for tag in paths.eval_model_tags(cfg) for task in cfg.eval.tasks}
    files = {md.name: artifacts.sha256_file(md), "seeds.json": artifacts.sha256_file(run / "seeds.json")}
    artifacts.write_sidecars(run, "seeds_report", cl_config.stage_view(cfg, "seeds_report"), inputs, started,
                             cfg.seed, prefix="report.", output=artifacts.output_record(md, files, primary=md.name))
    dvc_store.record([md, run / "seeds.json", run / f"report.{artifacts.CONFIG}", run / f"report.{artifacts.PROVENANCE}"])
    print(f"seeds_report: {md.resolve()}")
