"""Stage ``vdpo``: train the SFT LLaVA on the V-DPO pairs (SPEC §4), or, for the
plain-DPO ablation (``job.variant: dpo``), the same run with γ = 1.

Both use :class:`~closedloop.vlm.vdpo.VisionGuidedDPOTrainer` (TRL's DPOTrainer with the
guided policy log-probs; γ = 1 is exactly TRL's sigmoid DPO), the same pairs, settings and
seed, with the SFT model as policy initialisation and as the frozen reference.
γ for ``vdpo`` is chosen on validation questions (``vlm.vdpo.gamma_grid``, see :func:`main`).
Output ``results/<experiment>/vlm/<vdpo|dpo>/``: ``model/``, ``train_log.csv``, ``stats.json``
(and ``gamma_selection.json``, ``gamma/<γ>/train_log.csv`` when γ is selected).
"""

from __future__ import annotations

import json
import shutil

from closedloop import artifacts, checkpoints, paths, training
from closedloop import config as cl_config
from closedloop.vlm import model as vlm
from closedloop.vlm.vdpo import best_gamma, degenerate, gammas_of, train_one, validation_score


def main(cfg) -> None:
    """Train ``job.variant`` (``vdpo`` or the plain-DPO ablation ``dpo``) from the SFT model.

    For ``vdpo`` with a ``vlm.vdpo.gamma_grid``: one run per γ, each scored on the validation
    questions; the most accurate is kept (``model/``, ``train_log.csv``), the others' logs under
    ``gamma/<γ>/``, and every γ's validation scores in ``gamma_selection.json``.
    """
    variant = cfg.job.variant
    out_dir = paths.vdpo_dir(cfg, variant)  # raises on an unknown variant
    pairs, data, sft = paths.vdpo_pairs_dir(cfg), paths.vlm_data_dir(cfg), paths.vlm_model_dir(cfg, "sft")
    rows = artifacts.read_jsonl(pairs / "pairs.jsonl")
    if not rows:
        raise ValueError(f"{pairs / 'pairs.jsonl'}: no preference pairs to train on")
    with_alpha = "alpha" in rows[0]
    gammas = gammas_of(cfg, variant)
    if any(g < 0 for g in gammas):
        raise cl_config.ConfigError(f"key 'vlm.vdpo.gamma': expected numbers >= 0, got {gammas}")
    select = len(gammas) > 1
    view = cl_config.stage_view(cfg, "vdpo", model=variant)
    view["job"].update({"variant": variant, "gamma": gammas if select else gammas[0], "alpha": with_alpha})
    inputs = {"pairs": pairs, "data": data, "sft": sft.parent}
    work = checkpoints.work_dir(out_dir, view, inputs)  # survives a requeue: each γ's checkpoints, log, model
    with artifacts.artifact_dir(out_dir, "vdpo", view, inputs, cfg.seed) as out:
        table = [train_gamma(cfg, gamma, rows, (pairs, data, sft), with_alpha, select, work / f"gamma-{gamma:g}")
                 for gamma in gammas]
        entry = best_gamma(table) if select else table[0]
        chosen = work / f"gamma-{entry['gamma']:g}"
        shutil.copytree(chosen / "model", out / "model")
        training.save_logs(chosen, out)
        if select:
            for row in table:
                (out / "gamma" / f"{row['gamma']:g}").mkdir(parents=True)
                shutil.copyfile(work / f"gamma-{row['gamma']:g}" / "train_log.csv",
                                out / "gamma" / f"{row['gamma']:g}" / "train_log.csv")
            all_degenerate = all(degenerate(r["val"]) for r in table)
            if all_degenerate:
                print(f"vdpo: WARNING: every γ gave an all-yes or all-no model on validation; γ = {entry['gamma']:g} "
                      "kept for want of a better one", flush=True)
            sft_val = validation_score(*vlm.load(sft, cfg.vlm.model), data)  # the yardstick: did (V-)DPO help?
            (out / "gamma_selection.json").write_text(json.dumps(
                {"criterion": "validation accuracy among models that are not all-yes/all-no (ties: F1, then grid "
                              "order)", "validation": "val.jsonl", "chosen": entry["gamma"],
                 "all_degenerate": all_degenerate, "sft": sft_val, "table": table}, indent=2) + "\n")
        (out / "stats.json").write_text(json.dumps(
            {"pairs": len(rows), "steps": entry["steps"], "gamma": entry["gamma"], "alpha": with_alpha,
             "gamma_grid": gammas if select else None,
             "mean_alpha": sum(r.get("alpha", 0.0) for r in rows) / len(rows)}, indent=2) + "\n")
    checkpoints.finish(work)
    print(f"vdpo: {variant} (γ = {entry['gamma']:g}): {len(rows)} pairs, {entry['steps']} steps -> {out_dir}")


def train_gamma(cfg, gamma: float, rows: list[dict], inputs: tuple, with_alpha: bool, select: bool, work) -> dict:
    """Train (or, after a requeue, finish or reuse) the run of one γ in ``work``: its model
    (``model/``), log and table row (``entry.json``, with the validation scores when γ is selected)."""
    done = work / "entry.json"
    if done.is_file():
        print(f"vdpo: γ = {gamma:g}: finished before the requeue, reused from {work}")
        return json.loads(done.read_text())
    work.mkdir(parents=True, exist_ok=True)
    trainer, processor = train_one(cfg, gamma, rows, *inputs, with_alpha, work)
    entry = {"gamma": gamma, "steps": trainer.state.global_step}
    if select:
        entry["val"] = validation_score(trainer.model, processor, inputs[1])
        print(f"vdpo: γ = {gamma:g}: validation accuracy {entry['val']['accuracy']:.3f} "
              f"F1 {entry['val']['f1']:.3f} yes-ratio {entry['val']['yes_ratio']:.3f}")
    shutil.rmtree(work / "model", ignore_errors=True)
    vlm.save(trainer.model, processor, work / "model", cfg.vlm.model.lora.merge_after_training)
    with artifacts.atomic_file(done) as fh:  # written last: marks this γ complete
        fh.write(json.dumps(entry))
    return entry
