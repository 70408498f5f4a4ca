"""Stage ``vdpo_pairs``: response-contrast and image-contrast preference pairs (SPEC §4,
:mod:`closedloop.vlm.pairs`) in ``results/<experiment>/vlm/pairs/``."""

from __future__ import annotations

import json

from closedloop import artifacts, paths
from closedloop import config as cl_config
from closedloop.vlm.pairs import build


def main(cfg) -> None:
    """Build the V-DPO preference pairs from ``vlm_data``'s training scenes."""
    view = cl_config.stage_view(cfg, "vdpo_pairs")
    inputs = {"data": paths.vlm_data_dir(cfg)}
    if cfg.vlm.pairs.alpha == "score":
        inputs["sft"] = paths.vlm_sft_dir(cfg)
    with artifacts.artifact_dir(paths.vdpo_pairs_dir(cfg), "vdpo_pairs", view, inputs, cfg.seed) as out:
        stats = build(cfg, out)
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"vdpo_pairs: {stats['pairs']} pairs {stats['kinds']} -> {paths.vdpo_pairs_dir(cfg)}")
