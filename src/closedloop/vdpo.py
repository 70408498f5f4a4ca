"""Stage ``vdpo``: train the SFT LLaVA on the V-DPO pairs (SPEC §4), or, for the
plain-DPO ablation (``job.variant: dpo``), the same run with γ = 1.

Both use :class:`~closedloop.vdpo_trainer.VisionGuidedDPOTrainer` (TRL's DPOTrainer with the
guided policy log-probs; γ = 1 is exactly TRL's sigmoid DPO), the same pairs, settings and
seed, with the SFT model as policy initialisation and as the frozen reference.
γ for ``vdpo`` is chosen on validation questions (``vlm.vdpo.gamma_grid``, see :func:`main`).
Output ``results/<experiment>/vlm/<vdpo|dpo>/``: ``model/``, ``train_log.csv``, ``stats.json``
(and ``gamma_selection.json``, ``gamma/<γ>/train_log.csv`` when γ is selected).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from datasets import Dataset, Image, List
from transformers import set_seed

from closedloop import artifacts, models, vlm
from closedloop import config as cl_config
from closedloop.sft import CsvLogCallback


def preference_dataset(rows: list[dict], pairs: Path, data: Path, eos: str, with_alpha: bool) -> Dataset:
    """TRL's vision preference format plus ``rejected_images`` (image-contrast) and ``alpha``."""
    records = []
    for r in rows:
        rec = {"images": [str(data / r["image"])], "prompt": r["prompt"], "chosen": r["chosen"] + eos,
               "rejected": r["rejected"] + eos,
               "rejected_images": [str(pairs / r["rejected_image"])] if r.get("rejected_image") else []}
        if with_alpha:
            rec["alpha"] = float(r["alpha"])
        records.append(rec)
    ds = Dataset.from_list(records)
    return ds.cast_column("images", List(Image())).cast_column("rejected_images", List(Image()))


def training_args(cfg, output_dir: Path):
    from trl import DPOConfig as TrlDPOConfig

    d = cfg.vlm.vdpo
    return TrlDPOConfig(
        output_dir=str(output_dir), beta=d.beta, loss_type=["sigmoid"], learning_rate=d.learning_rate,
        lr_scheduler_type=d.lr_scheduler, warmup_steps=d.warmup_ratio, weight_decay=d.weight_decay,
        num_train_epochs=d.epochs, max_steps=d.max_steps, per_device_train_batch_size=d.batch_size,
        gradient_accumulation_steps=d.grad_accum, max_length=None, logging_steps=d.logging_steps,
        logging_first_step=True, precompute_ref_log_probs=False, save_strategy="no", report_to="none",
        seed=cfg.seed, data_seed=cfg.seed, bf16=models.bf16_training(cpu=False), fp16=False, dataloader_pin_memory=False,
    )


def gamma_of(cfg, variant: str) -> float:
    return 1.0 if variant == "dpo" else float(cfg.vlm.vdpo.gamma)


def gammas_of(cfg, variant: str) -> list[float]:
    """The γ values the job trains: 1 for ``dpo``; ``gamma_grid`` (else ``gamma``) for ``vdpo``."""
    if variant == "dpo":
        return [1.0]
    return [float(g) for g in cfg.vlm.vdpo.gamma_grid] or [float(cfg.vlm.vdpo.gamma)]


VAL_BATCH_SIZE = 32
VAL_MAX_NEW_TOKENS = 8


def validation_score(model, processor, data: Path) -> dict:
    """POPE metrics of ``model`` on ``val.jsonl`` (training-split images kept out of SFT and pairs)."""
    from closedloop import pope

    rows = artifacts.read_jsonl(data / "val.jsonl")
    model.eval()
    generations = pope.generate(model, processor, rows, data, VAL_BATCH_SIZE, VAL_MAX_NEW_TOKENS)
    answers = [pope.parse_answer(g) for g in generations]
    return {"n": len(rows), **pope.metrics_from_confusion(pope.confusion([r["label"] for r in rows], answers))}


def best_gamma(table: list[dict]) -> dict:
    """The row with the highest validation accuracy; ties go to higher F1, then to the γ listed first.

    Accuracy rather than F1: on a balanced set answering "yes" to everything scores F1 66.7
    (accuracy 50), so F1 alone would choose a degenerate model."""
    return max(enumerate(table), key=lambda it: (round(it[1]["val"]["accuracy"], 6), round(it[1]["val"]["f1"], 6),
                                                  -it[0]))[1]


def train_one(cfg, gamma: float, rows, pairs: Path, data: Path, sft: Path, with_alpha: bool, work: Path):
    """One (V-)DPO run from the SFT model; returns the trainer (its model trained)."""
    from closedloop.vdpo_trainer import VisionGuidedDPOTrainer

    set_seed(cfg.seed)
    model, processor = vlm.load(sft, cfg.vlm.model)
    ref_model, _ = vlm.load(sft, cfg.vlm.model)
    vlm.freeze_vision_tower(model, cfg.vlm.model)
    model = vlm.add_lora(model, cfg.vlm.model)  # the reference stays the plain SFT model
    model.train()
    trainer = VisionGuidedDPOTrainer(
        model=model, ref_model=ref_model, args=training_args(cfg, work / "trainer"), gamma=gamma,
        train_dataset=preference_dataset(rows, pairs, data, processor.tokenizer.eos_token, with_alpha),
        processing_class=processor, callbacks=[CsvLogCallback(work / "train_log.csv")],
    )
    trainer.train()
    shutil.rmtree(work / "trainer", ignore_errors=True)
    return trainer, processor


def main(cfg) -> None:
    """Train ``job.variant`` (``vdpo`` or the plain-DPO ablation ``dpo``) from the SFT model.

    For ``vdpo`` with a ``vlm.vdpo.gamma_grid``: one run per γ, each scored on the validation
    questions; the most accurate is kept (``model/``, ``train_log.csv``), the others' logs under
    ``gamma/<γ>/``, and every γ's validation scores in ``gamma_selection.json``.
    """
    variant = cfg.job.variant
    out_dir = vlm.train_dir(cfg, variant)  # raises on an unknown variant
    pairs, data, sft = vlm.pairs_dir(cfg), vlm.data_dir(cfg), vlm.model_dir(cfg, "sft")
    rows = artifacts.read_jsonl(pairs / "pairs.jsonl")
    if not rows:
        raise ValueError(f"{pairs / 'pairs.jsonl'}: no preference pairs to train on")
    with_alpha = "alpha" in rows[0]
    gammas = gammas_of(cfg, variant)
    if any(g < 0 for g in gammas):
        raise cl_config.ConfigError(f"key 'vlm.vdpo.gamma': expected numbers >= 0, got {gammas}")
    select = len(gammas) > 1
    view = vlm.stage_view(cfg, "vdpo", model=variant)
    view["job"].update({"variant": variant, "gamma": gammas if select else gammas[0], "alpha": with_alpha})
    with artifacts.artifact_dir(out_dir, "vdpo", view, {"pairs": pairs, "data": data, "sft": sft.parent},
                                cfg.seed) as out:
        table, kept = [], None
        for gamma in gammas:
            work = out / "gamma" / f"{gamma:g}" if select else out
            work.mkdir(parents=True, exist_ok=True)
            trainer, processor = train_one(cfg, gamma, rows, pairs, data, sft, with_alpha, work)
            entry = {"gamma": gamma, "steps": trainer.state.global_step}
            if select:
                entry["val"] = validation_score(trainer.model, processor, data)
                print(f"vdpo: γ = {gamma:g}: validation accuracy {entry['val']['accuracy']:.3f} "
                      f"F1 {entry['val']['f1']:.3f} yes-ratio {entry['val']['yes_ratio']:.3f}")
                if kept is None or best_gamma([kept[0], entry]) is entry:
                    kept = (entry, trainer, processor, work)
            else:
                kept = (entry, trainer, processor, work)
            table.append(entry)
        entry, trainer, processor, work = kept
        vlm.save(trainer.model, processor, out / "model", cfg.vlm.model.lora.merge_after_training)
        if select:
            shutil.copyfile(work / "train_log.csv", out / "train_log.csv")
            (out / "gamma_selection.json").write_text(json.dumps(
                {"criterion": "validation accuracy (ties: F1, then grid order)", "validation": "val.jsonl",
                 "chosen": entry["gamma"], "table": table}, indent=2) + "\n")
        (out / "stats.json").write_text(json.dumps(
            {"pairs": len(rows), "steps": trainer.state.global_step, "gamma": entry["gamma"], "alpha": with_alpha,
             "gamma_grid": gammas if select else None,
             "mean_alpha": sum(r.get("alpha", 0.0) for r in rows) / len(rows)}, indent=2) + "\n")
    print(f"vdpo: {variant} (γ = {entry['gamma']:g}): {len(rows)} pairs, {trainer.state.global_step} steps -> {out_dir}")
