"""One builder of TRL training arguments for every training stage (``sft``, ``dpo``,
``vlm_sft``, ``vdpo``): the same mapping from :class:`~closedloop.config.TrainArgs`, the same
precision logic (:func:`closedloop.models.trainer_precision`) and the same checkpointing
for a resume after a requeue (:func:`closedloop.checkpoints.enable`). Written by hand
because each stage's section is ours; the arguments themselves are TRL's.
"""

from __future__ import annotations

from pathlib import Path

from closedloop import checkpoints, models

TRL_CONFIGS = ("sft", "dpo")


def trainer_args(kind: str, t, output_dir: Path, seed: int, bf16: bool | None, **extra):
    """TRL's ``SFTConfig`` (``kind`` sft) or ``DPOConfig`` (dpo) from the settings ``t`` (a
    :class:`~closedloop.config.TrainArgs` section), with periodic checkpoints into
    ``output_dir`` when the launch settings ask for them; ``extra`` adds the trainer's own
    arguments (``beta``, ``max_length``, ...)."""
    from trl import DPOConfig, SFTConfig

    if kind not in TRL_CONFIGS:
        raise ValueError(f"trainer_args: kind {kind!r} (expected one of {TRL_CONFIGS})")
    config_class = SFTConfig if kind == "sft" else DPOConfig
    args = config_class(
        output_dir=str(output_dir), num_train_epochs=t.epochs, max_steps=t.max_steps,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, logging_steps=t.logging_steps, logging_first_step=True,
        save_strategy="no", report_to="none", seed=seed, data_seed=seed,
        **models.trainer_precision(bf16), **extra,
    )
    return checkpoints.enable(args)
