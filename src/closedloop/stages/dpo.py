"""Stage ``dpo``: train policy_k from policy_{k−1} on step-level preference pairs with
conservative DPO (SPEC §3, :mod:`closedloop.cdpo`).

Where the pairs come from depends on the loop variant:

- ``closedloop``: MCTS pairs searched by this loop's policy_{k−1} (``iter<k>/mcts``);
- ``plain_dpo``: the same, in its own loop, trained with α = 0;
- ``offline_mcts``: the closed loop's iteration-1 pairs (searched by the SFT policy),
  reused at every iteration;
- ``instance_online``: full solutions sampled from policy_{k−1}, correct vs incorrect,
  α = 0 (stage ``instance``).

The reference model is the SFT model (SPEC §3, default) or policy_{k−1}
(``dpo.reference: previous``). Output: ``iter<k>/dpo/{model/, train_log.csv}``.
"""

from __future__ import annotations

import json

from transformers import set_seed

from closedloop import artifacts, checkpoints, models, paths, training
from closedloop import config as cl_config
from closedloop.checkpoints import CsvLogCallback
from closedloop.loop.pairs import confident_pairs, preference_dataset, uses_alpha


def main(cfg) -> None:
    """Train policy_k of loop ``job.variant`` (iteration ``job.iteration``)."""
    from closedloop.cdpo import ConservativeDPOTrainer

    k, variant = cfg.job.iteration, cfg.job.variant
    if not k or k < 1:
        raise cl_config.ConfigError(f"key 'job.iteration': expected an integer >= 1, got {k}")
    set_seed(cfg.seed)
    d = cl_config.dpo_for(cfg, k)
    source = paths.pairs_artifact(cfg, k, variant) / "pairs.jsonl"
    searched = artifacts.read_jsonl(source)
    rows = confident_pairs(searched, d.min_q_margin)
    if not rows:
        raise ValueError(f"{source}: no preference pairs to train on ({len(searched)} searched, none with "
                         f"Q_w - Q_l > dpo.min_q_margin = {d.min_q_margin})")
    with_alpha = uses_alpha(d, variant)
    policy_in, ref_in = paths.policy_dir(cfg, k - 1, variant), paths.reference_dir(cfg, cl_config.enum_value(d.reference), k, variant)
    inputs = {"pairs": source, "policy": policy_in, "reference": ref_in}
    artifacts.check_inputs("dpo", inputs)  # before training: never train on pairs or a policy that changed
    model, tokenizer = models.load_dir(policy_in, cfg.model)
    ref_model, _ = models.load_dir(ref_in, cfg.model)
    lora = cfg.model.lora
    peft_config = models.lora_config(lora) if lora.enabled else None
    view = cl_config.stage_view(cfg, "dpo", iteration=k)
    view["job"] = {"iteration": k, "variant": variant, "pairs": str(source), "alpha": with_alpha}
    out_dir = paths.dpo_dir(cfg, k, variant)
    work = checkpoints.work_dir(out_dir, view, inputs)  # survives a requeue: checkpoints, running log
    resume_step = checkpoints.step_of(checkpoints.latest(work / "trainer"))
    with artifacts.artifact_dir(out_dir, "dpo", view, inputs, cfg.seed) as out:
        trainer = ConservativeDPOTrainer(
            model=model, ref_model=ref_model, args=training.trainer_args(
                "dpo", d, work / "trainer", cfg.seed, cfg.model.bf16_training, beta=d.beta, loss_type=["sigmoid"],
                max_length=d.max_length, precompute_ref_log_probs=d.precompute_ref),
            train_dataset=preference_dataset(rows, with_alpha), processing_class=tokenizer,
            callbacks=[CsvLogCallback(work / "train_log.csv", resume_step)], peft_config=peft_config,
        )
        checkpoints.train(trainer, work / "trainer", "dpo")
        if checkpoints.is_main_process():
            models.save_policy(trainer.model, tokenizer, out / "model", lora.enabled and lora.merge_after_training)
            training.save_logs(work, out)
            (out / "stats.json").write_text(json.dumps(
                {"pairs": len(rows), "pairs_searched": len(searched), "min_q_margin": d.min_q_margin,
                 "bf16_autocast": trainer.args.bf16,
                 "steps": trainer.state.global_step, "alpha": with_alpha,
                 "mean_alpha": sum(r.get("alpha", 0.0) for r in rows) / len(rows) if with_alpha else 0.0},
                indent=2) + "\n")
    checkpoints.finish(work)
    print(f"dpo: {paths.model_tag(k, variant)}: {len(rows)} of {len(searched)} pairs, {trainer.state.global_step} steps -> {out_dir}")
