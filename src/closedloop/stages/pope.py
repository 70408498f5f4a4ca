"""Stage ``pope``: POPE-style object-presence evaluation of one of the branch's LLaVAs (SPEC §4,
:mod:`closedloop.vlm.pope`). Output ``results/<experiment>/vlm/pope/<tag>/``: ``predictions.jsonl``
(question, label, generation, parsed answer) and ``metrics.json``."""

from __future__ import annotations

import json

from transformers import set_seed

from closedloop import artifacts, paths
from closedloop import config as cl_config
from closedloop.vlm import model as vlm
from closedloop.vlm.pope import generate, parse_answer, pope_metrics


def main(cfg) -> None:
    """Evaluate model ``job.model`` (sft, dpo or vdpo) on the POPE-style held-out set."""
    tag = cfg.job.model
    if tag is None:
        raise cl_config.ConfigError("pope: key 'job.model' is required (one of sft, dpo, vdpo)")
    source, data = paths.vlm_model_dir(cfg, tag), paths.vlm_data_dir(cfg)
    rows = artifacts.read_jsonl(data / "pope.jsonl")
    p = cfg.vlm.pope
    view = cl_config.stage_view(cfg, "pope", model=tag)
    with artifacts.artifact_dir(paths.pope_dir(cfg, tag), "pope", view, {"data": data, "model": source.parent},
                                cfg.seed) as out:
        set_seed(cfg.seed)
        model, processor = vlm.load(source, cfg.vlm.model)
        generations = generate(model, processor, rows, data, p.batch_size, p.max_new_tokens)
        metrics = pope_metrics(cfg, tag, source, data, rows, generations)
        with open(out / "predictions.jsonl", "w") as fh:
            artifacts.write_jsonl(fh, ({"id": r["id"], "split": r["split"], "question": r["question"],
                                        "label": r["label"], "generation": g, "answer": parse_answer(g, p.answer_rule)}
                                       for r, g in zip(rows, generations, strict=True)))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    a = metrics["all"]
    print(f"pope: {tag}: F1 {a['f1']:.3f} [{a['ci']['f1'][0]:.3f}, {a['ci']['f1'][1]:.3f}] "
          f"acc {a['accuracy']:.3f} yes-ratio {a['yes_ratio']:.3f} n={a['n']}")
