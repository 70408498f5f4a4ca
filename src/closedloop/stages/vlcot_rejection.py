"""Stage ``vlcot_rejection``: one round of rejection-sampling tuning (SPEC §6), ``job.model`` =
``round<k>``, starting from round k−1 (round 0 = the ``vision`` SFT model).

The model samples ``n_samples`` interleaved chains per training question (text at
``temperature``, patches ~ Bernoulli(Ŝ) when ``sample_patches``); each chain gets the function
score (answer correct + mean ⟨look⟩ IoU with gold) and, with ``judge``, the model-based score (its
own P("yes") to "Is this reasoning correct?"); the best chain per question by function score is
kept when it reaches ``threshold``; the model is fine-tuned on the kept chains, teacher-forced with
the patches it selected itself (``looks: sampled``) or with the gold ones (``looks: gold``).

Output ``results/<experiment>/vlcot/rejection/round<k>/``: ``model/``, ``vision_head.safetensors``,
``samples.jsonl`` (every chain with both scores), ``kept.jsonl``, ``agreement.json`` (the scores'
agreement, :func:`closedloop.vlcot.chains.agreement`), ``train_log.csv``, ``stats.json``.
"""

from __future__ import annotations

import json
import shutil

import torch

from closedloop import artifacts, checkpoints, paths
from closedloop import config as cl_config
from closedloop.vlcot import chains, scenes
from closedloop.vlcot import model as vm
from closedloop.vlcot.train import fit


def main(cfg) -> None:
    """Sample, score, filter and fine-tune: round ``job.model``."""
    tag = cfg.job.model or ""
    if not tag.startswith("round") or not tag.removeprefix("round").isdigit() or int(tag[5:]) < 1:
        raise cl_config.ConfigError(f"vlcot_rejection: key 'job.model': expected round<k> with k >= 1, got {tag!r}")
    k, v, r = int(tag[5:]), cfg.vlcot, cfg.vlcot.rejection
    data, out_dir = paths.vlcot_data_dir(cfg), paths.vlcot_round_dir(cfg, k)
    source = paths.vlcot_model_artifact(cfg, f"round{k - 1}")
    rows = artifacts.read_jsonl(data / "train.jsonl")
    rows = rows[:r.n_questions] if r.n_questions else rows
    view = cl_config.stage_view(cfg, "vlcot_rejection", model=tag)
    work = checkpoints.work_dir(out_dir, view, {"data": data, "model": source})
    with artifacts.artifact_dir(out_dir, "vlcot_rejection", view, {"data": data, "model": source}, cfg.seed) as out:
        model, processor = vm.load(source, v.model, v.head, with_head=True)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + k)
        repeated = [row for row in rows for _ in range(r.n_samples)]
        sampled = chains.generate(model, processor, data, repeated, max_new_tokens=r.max_new_tokens,
                                  temperature=r.temperature, select_threshold=v.head.select_threshold,
                                  sample_patches=r.sample_patches, generator=gen, batch_size=r.batch_size_sampling)
        judged = chains.judge(model, processor, data, repeated, sampled, r.batch_size_sampling) if r.judge else None
        groups, kept = [], []
        for i, row in enumerate(rows):
            group = []
            for j in range(r.n_samples):
                c = sampled[i * r.n_samples + j]
                group.append({"id": row["id"], "sample": j, "text": c["text"], "answer": c["answer"],
                              "completion_ids": c["completion_ids"], "looks": c["looks"],
                              "correct": c["answer"] == row["answer"], "function_score": chains.function_score(c, row),
                              "model_score": judged[i * r.n_samples + j] if judged else None})
            groups.append(group)
            best = chains.keep_best(group, r.threshold)
            if best is not None:
                kept.append((row, best))
        agreement = chains.agreement(groups) if r.judge else {}
        with open(out / "samples.jsonl", "w") as fh:
            artifacts.write_jsonl(fh, (c for g in groups for c in g))
        with open(out / "kept.jsonl", "w") as fh:
            artifacts.write_jsonl(fh, (c for _, c in kept))
        (out / "agreement.json").write_text(json.dumps(agreement, indent=2) + "\n")
        steps = 0
        if kept:
            vm.freeze_and_lora(model, v.model)
            examples = [(row, c["completion_ids"], training_looks(c, row, r.looks)) for row, c in kept]
            steps = fit(cfg, model, processor, examples, data, r, work, "vlcot_rejection",
                        v.model.bf16_training).state.global_step
            shutil.copyfile(work / "train_log.csv", out / "train_log.csv")
        vm.save(model, processor, out)
        flat = [c for g in groups for c in g]
        stats = {"round": k, "questions": len(rows), "chains": len(flat), "kept": len(kept), "steps": steps,
                 "sampled_accuracy": sum(c["correct"] for c in flat) / max(len(flat), 1),
                 "kept_accuracy": sum(c["correct"] for _, c in kept) / max(len(kept), 1)}
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    checkpoints.finish(work)
    print(f"vlcot_rejection: round {k}: kept {len(kept)}/{len(rows)} questions, {steps} steps, "
          f"agreement {agreement} -> {out_dir}")


def training_looks(chain: dict, row: dict, mode: str) -> list[list[int]]:
    """The patch sets a kept chain is teacher-forced with: its own selections, or (``gold``) the gold
    sets when it has as many ⟨look⟩s as the gold chain (else its own)."""
    gold = scenes.looks(row["steps"])
    return gold if mode == "gold" and len(gold) == len(chain["looks"]) else chain["looks"]
