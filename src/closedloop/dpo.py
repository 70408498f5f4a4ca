"""Stage ``dpo``: train policy_k from policy_{k−1} on step-level preference pairs with
conservative DPO (SPEC §3, :mod:`closedloop.cdpo`).

Where the pairs come from depends on the loop variant:

- ``closedloop``: MCTS pairs searched by this loop's policy_{k−1} (``iter<k>/mcts``);
- ``plain_dpo``: the same, in its own loop, trained with α = 0;
- ``offline_mcts``: the closed loop's iteration-1 pairs (searched by the SFT policy),
  reused at every iteration;
- ``instance_online``: full solutions sampled from policy_{k−1}, correct vs incorrect,
  α = 0 (``instance.py``).

The reference model is the SFT model (SPEC §3, default) or policy_{k−1}
(``dpo.reference: previous``). Output: ``iter<k>/dpo/{model/, train_log.csv}``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from datasets import Dataset
from transformers import set_seed

from closedloop import artifacts, checkpoints, models, paths
from closedloop import config as cl_config
from closedloop.sft import CsvLogCallback

ALPHA_FREE = ("plain_dpo", "instance_online")


def pairs_artifact(cfg, k: int, variant: str) -> Path:
    """The artifact dir whose ``pairs.jsonl`` trains policy_k of ``variant``. Every MCTS
    variant's first search runs the SFT policy with the same search config and seed, so
    iteration 1 of each reads the closed loop's iteration-1 search instead of repeating it;
    offline MCTS reads it at every iteration."""
    if variant == "instance_online":
        return paths.instance_dir(cfg, k)
    if variant == "offline_mcts" or k == 1:
        return paths.mcts_dir(cfg, 1) / "merged"
    return paths.mcts_dir(cfg, k, variant) / "merged"


def pairs_path(cfg, k: int, variant: str) -> Path:
    return pairs_artifact(cfg, k, variant) / "pairs.jsonl"


def uses_alpha(d, variant: str) -> bool:
    return d.use_alpha and variant not in ALPHA_FREE


def confident_pairs(rows: list[dict], margin: float) -> list[dict]:
    """Pairs whose search values differ by more than ``margin`` (Q_w − Q_l > margin); pairs
    without Q values (instance-level ablation) are all kept."""
    if margin <= 0:
        return rows
    return [r for r in rows if "q_chosen" not in r or r["q_chosen"] - r["q_rejected"] > margin]


def preference_dataset(rows: list[dict], with_alpha: bool) -> Dataset:
    keep = ["prompt", "chosen", "rejected"] + (["alpha"] if with_alpha else [])
    return Dataset.from_list([{k: r[k] for k in keep} for r in rows])


def training_args(cfg, d, output_dir: Path):
    """TRL's DPOConfig from our settings ``d`` of one iteration (sigmoid loss; α is added by cDPO)."""
    from trl import DPOConfig as TrlDPOConfig

    return TrlDPOConfig(
        output_dir=str(output_dir), beta=d.beta, loss_type=["sigmoid"],
        learning_rate=d.learning_rate, lr_scheduler_type=d.lr_scheduler, warmup_steps=d.warmup_ratio,
        weight_decay=d.weight_decay, num_train_epochs=d.epochs, max_steps=d.max_steps,
        per_device_train_batch_size=d.batch_size, gradient_accumulation_steps=d.grad_accum,
        max_length=d.max_length, logging_steps=d.logging_steps, logging_first_step=True,
        precompute_ref_log_probs=d.precompute_ref, save_strategy="no", report_to="none",
        seed=cfg.seed, data_seed=cfg.seed, **models.trainer_precision(cfg.model.bf16_training),
    )


def reference_dir(cfg, d, k: int, variant: str) -> Path:
    ref = cl_config.enum_value(d.reference)
    return paths.policy_dir(cfg, 0) if ref == "sft" else paths.policy_dir(cfg, k - 1, variant)


def main(cfg) -> None:
    """Train policy_k of loop ``job.variant`` (iteration ``job.iteration``)."""
    from closedloop.cdpo import ConservativeDPOTrainer

    k, variant = cfg.job.iteration, cfg.job.variant
    if not k or k < 1:
        raise cl_config.ConfigError(f"key 'job.iteration': expected an integer >= 1, got {k}")
    set_seed(cfg.seed)
    d = cl_config.dpo_for(cfg, k)
    source = pairs_path(cfg, k, variant)
    searched = artifacts.read_jsonl(source)
    rows = confident_pairs(searched, d.min_q_margin)
    if not rows:
        raise ValueError(f"{source}: no preference pairs to train on ({len(searched)} searched, none with "
                         f"Q_w - Q_l > dpo.min_q_margin = {d.min_q_margin})")
    with_alpha = uses_alpha(d, variant)
    policy_in, ref_in = paths.policy_dir(cfg, k - 1, variant), reference_dir(cfg, d, k, variant)
    model, tokenizer = models.load_dir(policy_in, cfg.model)
    ref_model, _ = models.load_dir(ref_in, cfg.model)
    lora = cfg.model.lora
    peft_config = models.lora_config(lora) if lora.enabled else None
    view = cl_config.stage_view(cfg, "dpo", iteration=k)
    view["job"] = {"iteration": k, "variant": variant, "pairs": str(source), "alpha": with_alpha}
    inputs = {"pairs": source, "policy": policy_in, "reference": ref_in}
    out_dir = paths.dpo_dir(cfg, k, variant)
    work = checkpoints.work_dir(out_dir, view)  # survives a requeue: checkpoints, running log
    resume_step = checkpoints.step_of(checkpoints.latest(work / "trainer"))
    with artifacts.artifact_dir(out_dir, "dpo", view, inputs, cfg.seed) as out:
        trainer = ConservativeDPOTrainer(
            model=model, ref_model=ref_model, args=checkpoints.enable(training_args(cfg, d, work / "trainer")),
            train_dataset=preference_dataset(rows, with_alpha), processing_class=tokenizer,
            callbacks=[CsvLogCallback(work / "train_log.csv", resume_step)], peft_config=peft_config,
        )
        checkpoints.train(trainer, work / "trainer", "dpo")
        if checkpoints.is_main_process():
            models.save_policy(trainer.model, tokenizer, out / "model", lora.enabled and lora.merge_after_training)
            shutil.copyfile(work / "train_log.csv", out / "train_log.csv")
            (out / "stats.json").write_text(json.dumps(
                {"pairs": len(rows), "pairs_searched": len(searched), "min_q_margin": d.min_q_margin,
                 "bf16_autocast": trainer.args.bf16,
                 "steps": trainer.state.global_step, "alpha": with_alpha,
                 "mean_alpha": sum(r.get("alpha", 0.0) for r in rows) / len(rows) if with_alpha else 0.0},
                indent=2) + "\n")
    checkpoints.finish(work)
    print(f"dpo: {paths.model_tag(k, variant)}: {len(rows)} of {len(searched)} pairs, {trainer.state.global_step} steps -> {out_dir}")
