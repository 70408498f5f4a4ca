"""Stage ``vdpo``: train the SFT LLaVA on the V-DPO pairs (SPEC §4), or, for the
plain-DPO ablation (``job.variant: dpo``), the same run with γ = 1.

Both use :class:`~closedloop.vdpo_trainer.VisionGuidedDPOTrainer` (TRL's DPOTrainer with the
guided policy log-probs; γ = 1 is exactly TRL's sigmoid DPO), the same pairs, settings and
seed, with the SFT model as policy initialisation and as the frozen reference.
Output ``results/<experiment>/vlm/<vdpo|dpo>/``: ``model/``, ``train_log.csv``, ``stats.json``.
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
        seed=cfg.seed, data_seed=cfg.seed, bf16=models.bf16_training(), fp16=False, dataloader_pin_memory=False,
    )


def gamma_of(cfg, variant: str) -> float:
    return 1.0 if variant == "dpo" else float(cfg.vlm.vdpo.gamma)


def main(cfg) -> None:
    """Train ``job.variant`` (``vdpo`` or the plain-DPO ablation ``dpo``) from the SFT model."""
    from closedloop.vdpo_trainer import VisionGuidedDPOTrainer

    variant = cfg.job.variant
    out_dir = vlm.train_dir(cfg, variant)  # raises on an unknown variant
    set_seed(cfg.seed)
    pairs, data, sft = vlm.pairs_dir(cfg), vlm.data_dir(cfg), vlm.model_dir(cfg, "sft")
    rows = artifacts.read_jsonl(pairs / "pairs.jsonl")
    if not rows:
        raise ValueError(f"{pairs / 'pairs.jsonl'}: no preference pairs to train on")
    with_alpha = "alpha" in rows[0]
    gamma = gamma_of(cfg, variant)
    if not 0.0 <= gamma:
        raise cl_config.ConfigError(f"key 'vlm.vdpo.gamma': expected a number >= 0, got {gamma}")
    model, processor = vlm.load(sft, cfg.vlm.model)
    ref_model, _ = vlm.load(sft, cfg.vlm.model)
    vlm.freeze_vision_tower(model, cfg.vlm.model)
    model.train()
    view = vlm.stage_view(cfg, "vdpo", model=variant)
    view["job"].update({"variant": variant, "gamma": gamma, "alpha": with_alpha})
    with artifacts.artifact_dir(out_dir, "vdpo", view, {"pairs": pairs, "data": data, "sft": sft.parent},
                                cfg.seed) as out:
        trainer = VisionGuidedDPOTrainer(
            model=model, ref_model=ref_model, args=training_args(cfg, out / "trainer"), gamma=gamma,
            train_dataset=preference_dataset(rows, pairs, data, processor.tokenizer.eos_token, with_alpha),
            processing_class=processor, callbacks=[CsvLogCallback(out / "train_log.csv")],
        )
        trainer.train()
        vlm.save(trainer.model, processor, out / "model")
        (out / "stats.json").write_text(json.dumps(
            {"pairs": len(rows), "steps": trainer.state.global_step, "gamma": gamma, "alpha": with_alpha,
             "mean_alpha": sum(r.get("alpha", 0.0) for r in rows) / len(rows)}, indent=2) + "\n")
        shutil.rmtree(out / "trainer", ignore_errors=True)
    print(f"vdpo: {variant} (γ = {gamma}): {len(rows)} pairs, {trainer.state.global_step} steps -> {out_dir}")
