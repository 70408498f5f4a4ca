"""Stage ``vlm_report``: the V-DPO branch's report, ``results/<experiment>/vlm/report.md``
(:func:`closedloop.vlm.pope.render_report`), with its sidecars."""

from __future__ import annotations

from closedloop import artifacts, paths
from closedloop import config as cl_config
from closedloop.vlm.pope import render_report


def main(cfg) -> None:
    """Write the POPE table of every model in ``vlm.pope.models``."""
    tags = list(cfg.vlm.pope.models)
    view = cl_config.stage_view(cfg, "vlm_report")
    out = paths.vlm_report_file(cfg)
    started = artifacts.now()
    with artifacts.atomic_file(out) as fh:
        fh.write(render_report(cfg))
    artifacts.write_sidecars(out.parent, "vlm_report", view, {t: paths.pope_dir(cfg, t) for t in tags}, started,
                             cfg.seed, prefix="report.",  # its own content too, so lineage verify can check it
                             output=artifacts.output_record(out, {out.name: artifacts.sha256_file(out)}, primary=out.name))
    print(f"vlm_report: -> {out}")
