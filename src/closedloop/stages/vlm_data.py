"""Stage ``vlm_data``: easy-VQA scenes, SFT questions and a POPE-style held-out set (SPEC §4,
:mod:`closedloop.vlm.scenes`) in ``data/<experiment>/vlm/``."""

from __future__ import annotations

import json

from closedloop import artifacts, paths
from closedloop import config as cl_config
from closedloop.vlm.scenes import build


def main(cfg) -> None:
    """Build the V-DPO branch's data from the easy-vqa package."""
    out_dir = paths.vlm_data_dir(cfg)
    view = cl_config.stage_view(cfg, "vlm_data")
    with artifacts.artifact_dir(out_dir, "vlm_data", view, {}, cfg.seed) as out:
        stats = build(cfg, out)
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"vlm_data: {stats['sft_rows']} SFT rows on {stats['train_images']} images, "
          f"{stats['pope_rows']} POPE questions on {stats['pope_images']} images -> {out_dir}")
