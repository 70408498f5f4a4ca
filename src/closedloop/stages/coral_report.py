"""Stage ``coral_report``: ``results/<experiment>/coral/report.md`` (:mod:`closedloop.coral.report`,
SPEC §5) with its config and provenance sidecars (``report.config.yaml``, ``report.provenance.json``)."""

from __future__ import annotations

from closedloop import artifacts, paths
from closedloop import config as cl_config
from closedloop.coral.report import render


def main(cfg) -> None:
    """Write the COrAL report from the stages' stats and the evaluations' metrics."""
    started, md = artifacts.now(), paths.coral_report_file(cfg)
    tag = paths.coral_input_tag(cfg)
    inputs = {f"coral/stage{s}": paths.coral_stage_dir(cfg, s) / "stats.json" for s in (1, 2)}
    for d, task in paths.coral_eval_runs(cfg):
        inputs[f"coral/eval/{d}/{task}"] = paths.coral_eval_dir(cfg, d, task) / "predictions.jsonl"
        inputs[f"eval/{tag}/{task}"] = paths.eval_dir(cfg, tag, task) / "predictions.jsonl"
    with artifacts.atomic_file(md) as fh:
        fh.write(render(cfg))
    artifacts.write_sidecars(md.parent, "coral_report", cl_config.stage_view(cfg, "coral_report"), inputs, started,
                             cfg.seed, prefix="report.",
                             output=artifacts.output_record(md, {md.name: artifacts.sha256_file(md)}, primary=md.name))
    print(f"coral_report: {md.resolve()}")
