"""Stage ``data``: write one task's splits as JSONL in the shared schema (see tasks.py)."""

from __future__ import annotations

import json

from closedloop import artifacts, paths, sources, tasks
from closedloop import config as cl_config


def main(cfg) -> None:
    """Build ``data/<experiment>/<task>/{train,heldout,validation}.jsonl`` for ``cfg.job.task``."""
    name = cfg.job.task
    if name not in cfg.data.tasks:
        raise cl_config.ConfigError(f"key 'job.task': {name!r} is not in data.tasks ({sorted(cfg.data.tasks)})")
    splits = tasks.build_splits(name, cfg.data.tasks[name], cfg.seed, cfg.data)
    tasks.check_disjoint(splits, name)
    view = cl_config.stage_view(cfg, "data", [name])
    inputs = sources.task_files(cfg.data.tasks[name])  # a jsonl task's own files
    with artifacts.artifact_dir(paths.data_dir(cfg, name), "data", view, inputs, cfg.seed) as out:
        for split, rows in splits.items():
            with open(out / f"{split}.jsonl", "w") as fh:
                artifacts.write_jsonl(fh, rows)
        counts = {split: len(rows) for split, rows in splits.items()}
        (out / "stats.json").write_text(json.dumps({"task": name, "rows": counts}, indent=2) + "\n")
    print(f"data: {name}: {counts} -> {paths.data_dir(cfg, name)}")
