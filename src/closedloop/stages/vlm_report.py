"""Stage ``vlm_report``: the V-DPO branch's report, ``results/<experiment>/vlm/report.md``
(:func:`closedloop.vlm.pope.render_report`) and the same tables as ``report.rst`` for
``snakemake --report``'s landing page (:func:`closedloop.reporting.md_to_rst`), with its sidecars."""

from __future__ import annotations

from closedloop import artifacts, paths
from closedloop import config as cl_config
from closedloop.report_rst import md_to_rst
from closedloop.vlm.pope import render_report


def main(cfg) -> None:
    """Write the POPE table of every model in ``vlm.pope.models`` and the SFT model's grounding check."""
    tags = list(cfg.vlm.pope.models)
    view = cl_config.stage_view(cfg, "vlm_report")
    out, rst = paths.vlm_report_file(cfg), paths.vlm_report_rst(cfg)
    started = artifacts.now()
    markdown = render_report(cfg)
    with artifacts.atomic_file(out) as fh:
        fh.write(markdown)
    with artifacts.atomic_file(rst) as fh:
        fh.write(md_to_rst(markdown))
    files = {out.name: artifacts.sha256_file(out), rst.name: artifacts.sha256_file(rst)}
    inputs = {"vlm_sft": paths.vlm_sft_dir(cfg), **{t: paths.pope_dir(cfg, t) for t in tags}}  # its grounding check
    artifacts.write_sidecars(out.parent, "vlm_report", view, inputs, started, cfg.seed, prefix="report.",
                             output=artifacts.output_record(out, files, primary=out.name))
    print(f"vlm_report: -> {out}")
