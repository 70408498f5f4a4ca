"""Stage ``vlcot_data``: seeded multi-object scenes with exact grounding labels, their questions and
gold interleaved chains (SPEC §6, :mod:`closedloop.vlcot.scenes`) in ``data/<experiment>/vlcot/``."""

from __future__ import annotations

import json

from closedloop import artifacts, paths
from closedloop import config as cl_config
from closedloop.vlcot.scenes import build


def main(cfg) -> None:
    """Draw the scenes and write the train / validation / held-out questions (disjoint by scene)."""
    out_dir = paths.vlcot_data_dir(cfg)
    view = cl_config.stage_view(cfg, "vlcot_data")
    with artifacts.artifact_dir(out_dir, "vlcot_data", view, {}, cfg.seed) as out:
        stats = build(cfg, out)
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"vlcot_data: {stats['questions']} questions on {stats['scenes']} scenes, mix {stats['mix']} -> {out_dir}")
