"""One builder of TRL training arguments for every training stage (``sft``, ``dpo``,
``vlm_sft``, ``vdpo``): the same mapping from :class:`~closedloop.config.TrainArgs`, the same
precision logic (:func:`closedloop.models.trainer_precision`), the same checkpointing
for a resume after a requeue (:func:`closedloop.checkpoints.enable`), the same experiment
tracking (``report_to``) and pass-through of further ``TrainingArguments`` (``trainer_args``).
Written by hand because each stage's section is ours; the arguments themselves are TRL's.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from closedloop import checkpoints, models
from closedloop import config as cl_config

TRL_CONFIGS = ("sft", "dpo")
TRACKING = "tracking"  # beside the trainer's output dir in the work dir; copied into the artifact


def tracking_dir(output_dir: Path) -> Path:
    """Where the trainer writing checkpoints to ``output_dir`` reports ``report_to``'s metrics."""
    return Path(output_dir).parent / TRACKING


def _local_tracking(tracker: str, where: Path) -> None:
    """Point the tracker at files under ``where`` (no server needed): TensorBoard's event files
    (transformers reads ``TENSORBOARD_LOGGING_DIR`` when training starts), MLflow's file store and
    an offline W&B run, unless the user's environment already names a server or mode."""
    where.mkdir(parents=True, exist_ok=True)
    if tracker == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(where / "tensorboard")
    elif tracker == "mlflow":
        os.environ.setdefault("MLFLOW_TRACKING_URI", (where / "mlruns").resolve().as_uri())
    elif tracker == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ["WANDB_DIR"] = str(where)


def passed_through(config_class, extra: dict, ours: set[str], section: str) -> dict:
    """``trainer_args`` checked against ``config_class``'s fields: an unknown name, or one this
    builder sets from the section's own keys, fails naming the key."""
    known = {f.name for f in dataclasses.fields(config_class)}
    for key in extra:
        if key not in known:
            raise cl_config.ConfigError(
                f"key '{section}.trainer_args.{key}': not a field of TRL's {config_class.__name__} / TrainingArguments")
        if key in ours:
            raise cl_config.ConfigError(
                f"key '{section}.trainer_args.{key}': set by the section's own keys (closedloop.training.trainer_args)")
    return dict(extra)


def trainer_args(kind: str, t, output_dir: Path, seed: int, bf16: bool | None, section: str | None = None, **extra):
    """TRL's ``SFTConfig`` (``kind`` sft) or ``DPOConfig`` (dpo) from the settings ``t`` (a
    :class:`~closedloop.config.TrainArgs` section), with periodic checkpoints into
    ``output_dir`` when the launch settings ask for them; ``extra`` adds the trainer's own
    arguments (``beta``, ``max_length``, ...), then ``t.trainer_args`` any other field of the
    config class (validated by name). ``t.report_to`` other than none reports to files under
    :func:`tracking_dir` (``section`` names the config section in errors; default ``kind``)."""
    from trl import DPOConfig, SFTConfig

    if kind not in TRL_CONFIGS:
        raise ValueError(f"trainer_args: kind {kind!r} (expected one of {TRL_CONFIGS})")
    config_class = SFTConfig if kind == "sft" else DPOConfig
    tracker = cl_config.enum_value(getattr(t, "report_to", "none"))
    ours = dict(
        output_dir=str(output_dir), num_train_epochs=t.epochs, max_steps=t.max_steps,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, logging_steps=t.logging_steps, logging_first_step=True,
        save_strategy="no", report_to=tracker, seed=seed, data_seed=seed,
        **models.trainer_precision(bf16), **extra,
    )
    more = passed_through(config_class, dict(getattr(t, "trainer_args", None) or {}), set(ours), section or kind)
    if tracker != "none":
        _local_tracking(tracker, tracking_dir(output_dir))
    return checkpoints.enable(config_class(**ours, **more))


def save_logs(work: Path, out: Path, trainer_dir: Path | None = None) -> None:
    """Copy a training run's ``train_log.csv`` and its tracking files (when ``report_to`` wrote
    any, :func:`tracking_dir` of ``trainer_dir``, default ``work/trainer``) into the artifact ``out``."""
    shutil.copyfile(Path(work) / "train_log.csv", Path(out) / "train_log.csv")
    tracked = tracking_dir(trainer_dir or Path(work) / "trainer")
    if tracked.is_dir():
        shutil.copytree(tracked, Path(out) / TRACKING, dirs_exist_ok=True)
