"""Stage ``vlm_seeds_report``: the V-DPO branch over seeds (``seeds: [...]``, SPEC §4, §7;
:mod:`closedloop.vlm.seeds`): POPE-style scores per seed with mean ± sd, DPO's and V-DPO's paired
gain over the SFT model of their seed with a two-level bootstrap interval, and each seed's SFT
record. Writes ``results/<experiment>/vlm/report.md`` and ``seeds.json`` beside it."""

from __future__ import annotations

import json

from closedloop import artifacts, paths
from closedloop import config as cl_config
from closedloop.vlm.seeds import aggregate, render


def main(cfg) -> None:
    """Aggregate the per-seed POPE evaluations and SFT records of ``cfg.seeds`` into one report."""
    if not cfg.seeds:
        raise cl_config.ConfigError("vlm_seeds_report: key 'seeds' is empty (expected e.g. [0, 1, 2])")
    started = artifacts.now()
    md = paths.vlm_seeds_report_file(cfg)
    agg = aggregate(cfg)
    with artifacts.atomic_file(md.parent / "seeds.json") as fh:
        fh.write(json.dumps(agg, indent=2) + "\n")
    with artifacts.atomic_file(md) as fh:
        fh.write(render(cfg, agg))
    inputs = {f"seed{s}/vlm/{name}": d for s in cfg.seeds for c in [paths.for_seed(cfg, s)]
              for name, d in [("sft", paths.vlm_sft_dir(c)), *((f"pope/{t}", paths.pope_dir(c, t))
                                                                 for t in cfg.vlm.pope.models)]}
    files = {md.name: artifacts.sha256_file(md), "seeds.json": artifacts.sha256_file(md.parent / "seeds.json")}
    artifacts.write_sidecars(md.parent, "vlm_seeds_report", cl_config.stage_view(cfg, "vlm_seeds_report"), inputs,
                             started, cfg.seed, prefix="report.", output=artifacts.output_record(md, files, primary=md.name))
    print(f"vlm_seeds_report: {md.resolve()}")
