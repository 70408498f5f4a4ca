"""Stage ``vlm_report``: the V-DPO branch's report, ``results/<experiment>/vlm/report.md``
(:func:`closedloop.vlm.pope.render_report`), with its sidecars."""

from __future__ import annotations

from closedloop import artifacts, paths
from closedloop import config as cl_config
from closedloop.vlm.pope import render_report


def main(cfg) -> None:
    """Write the POPE table of every model in ``vlm.pope.models`` and the SFT model's grounding check."""
    tags = list(cfg.vlm.pope.models)
    view = cl_config.stage_view(cfg, "vlm_report")
    out = paths.vlm_report_file(cfg)
    started = artifacts.now()
    with artifacts.atomic_file(out) as fh:
        fh.write(render_report(cfg))
    inputs = {"vlm_sft": paths.vlm_sft_dir(cfg), **{t: paths.pope_dir(cfg, t) for t in tags}}  # its grounding check
    artifacts.write_sidecars(out.parent, "vlm_report", view, inputs, started, cfg.seed, prefix="report.")
    print(f"vlm_report: -> {out}")
