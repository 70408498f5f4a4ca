"""Stage ``vlcot_eval``: greedy chains of one model (``job.model``: base, direct, text, vision or
round<k>) on the ``vlcot.eval.split`` questions (SPEC §6–7, :mod:`closedloop.vlcot.report`).

Output ``results/<experiment>/vlcot/eval/<tag>/``: ``predictions.jsonl`` (chain text, ⟨look⟩
selections, parsed answer, correct) and ``metrics.json`` (accuracy by question type, IoU, F1, CIs)."""

from __future__ import annotations

import json

from transformers import set_seed

from closedloop import artifacts, paths
from closedloop import config as cl_config
from closedloop.vlcot import chains, report
from closedloop.vlcot import model as vm


def main(cfg) -> None:
    """Generate one greedy chain per question and score it."""
    tag, v, e = cfg.job.model, cfg.vlcot, cfg.vlcot.eval
    if tag is None:
        raise cl_config.ConfigError("vlcot_eval: key 'job.model' is required (base, direct, text, vision or round<k>)")
    data, source = paths.vlcot_data_dir(cfg), paths.vlcot_model_artifact(cfg, tag)
    grounded = tag == "vision" or tag.startswith("round")
    rows = artifacts.read_jsonl(data / f"{e.split}.jsonl")
    view = cl_config.stage_view(cfg, "vlcot_eval", model=tag)
    inputs = {"data": data, **({"model": source} if source else {})}
    with artifacts.artifact_dir(paths.vlcot_eval_dir(cfg, tag), "vlcot_eval", view, inputs, cfg.seed) as out:
        set_seed(cfg.seed)
        model, processor = vm.load(source or vm.base_source(v.model), v.model, v.head, with_head=grounded)
        preds = chains.generate(model, processor, data, rows, max_new_tokens=e.max_new_tokens,
                                select_threshold=v.head.select_threshold, batch_size=e.batch_size)
        m = report.metrics(rows, preds, grounded, e.n_bootstrap, e.ci_level, cfg.seed)
        with open(out / "predictions.jsonl", "w") as fh:
            artifacts.write_jsonl(fh, ({"id": r["id"], "qtype": r["qtype"], "question": r["question"],
                                        "gold": r["answer"], "text": p["text"], "looks": p["looks"],
                                        "answer": p["answer"], "correct": p["answer"] == r["answer"]}
                                       for r, p in zip(rows, preds, strict=True)))
        (out / "metrics.json").write_text(json.dumps({"model": tag, "split": e.split, **m}, indent=2) + "\n")
    a = m["all"]
    print(f"vlcot_eval: {tag}: accuracy {a['accuracy']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] n={a['n']}"
          + (f", IoU {m['iou']['mean']:.3f}" if grounded else ""))
