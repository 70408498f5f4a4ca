"""Stage ``vlcot_report``: the VL-CoT report, ``results/<experiment>/vlcot/report.md``
(:func:`closedloop.vlcot.report.render`), with its sidecars."""

from __future__ import annotations

from closedloop import artifacts, paths
from closedloop import config as cl_config
from closedloop.vlcot.report import render


def main(cfg) -> None:
    """Accuracy and grounding tables with CIs, paired tables, score agreement, time per stage."""
    view = cl_config.stage_view(cfg, "vlcot_report")
    out = paths.vlcot_report_file(cfg)
    started = artifacts.now()
    with artifacts.atomic_file(out) as fh:
        fh.write(render(cfg))
    inputs = {t: paths.vlcot_eval_dir(cfg, t) for t in paths.vlcot_model_tags(cfg)}
    artifacts.write_sidecars(out.parent, "vlcot_report", view, inputs, started, cfg.seed, prefix="report.")
    print(f"vlcot_report: -> {out}")
