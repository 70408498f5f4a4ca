"""Resumable training for sft/dpo: HF Trainer checkpoints in a work dir keyed by the config
and the inputs.

The work dir (``<artifact parent>/.work/<name>-<config hash>-<inputs hash>/``) outlives a
killed, preempted or requeued job, so the next run of the same stage with the same config
view *and the same input artifacts* (the sha256 of each input's provenance record,
:func:`closedloop.artifacts.inputs_key`) resumes from the latest complete
``checkpoint-<step>`` there; a run on other inputs starts afresh and removes the stale work
dirs of that artifact. It is removed once the artifact is in place. How often to save comes from the launch settings
(``checkpoint_steps``, :mod:`closedloop.launch`), not from the experiment config, because it
does not change what is trained.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

from closedloop import artifacts
from closedloop import config as cl_config

STATE = "trainer_state.json"  # written last by Trainer._save_checkpoint: once it parses, the checkpoint is complete


def is_main_process() -> bool:
    """Rank 0 of a torch.distributed job (or a single process)."""
    return int(os.environ.get("RANK", "0")) == 0


def work_dir(final: Path, view: dict, inputs: dict[str, Path], prefix: str | None = None) -> Path:
    """Where a stage producing ``final`` from ``inputs`` keeps its resume state (checkpoints,
    running train log): keyed by the config view and :func:`~closedloop.artifacts.inputs_key`.

    Other work dirs of the same artifact (``<prefix>-*``, default ``final``'s name) were left by
    a run on another config or other inputs and can never be resumed: rank 0 removes them."""
    final = Path(final)
    if prefix is None and is_main_process():  # a killed job's partial artifact goes at the stage's next start
        artifacts.remove_stale_tmp(final)
    prefix = prefix or final.name
    work = final.parent / ".work" / f"{prefix}-{cl_config.config_hash(view)[:12]}-{artifacts.inputs_key(inputs)[:12]}"
    if is_main_process() and work.parent.is_dir():
        for stale in work.parent.glob(f"{prefix}-*"):
            if stale != work and stale.is_dir():
                print(f"{prefix}: removing {stale} (resume state of another config or other inputs)", flush=True)
                shutil.rmtree(stale, ignore_errors=True)
    return work


def is_complete(checkpoint: Path) -> bool:
    """A checkpoint whose trainer state (written last) exists and parses: a job killed while
    writing it leaves an empty or cut file, which HF's resume would fail on."""
    try:
        return isinstance(json.loads((checkpoint / STATE).read_text()), dict)
    except (OSError, ValueError):
        return False


def latest(trainer_dir: Path) -> Path | None:
    """The complete ``checkpoint-<step>`` (:func:`is_complete`) with the highest step, or None."""
    found = []
    for path in Path(trainer_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and is_complete(path):
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint else 0


def enable(args, steps: int | None = None):
    """Turn on periodic checkpointing in a TrainingArguments (keeps the last two); ``steps``
    defaults to the launch settings' ``checkpoint_steps``."""
    from closedloop import launch

    steps = launch.checkpoint_steps() if steps is None else steps
    if steps > 0:
        args.set_save(strategy="steps", steps=steps, total_limit=2)
    return args


def train(trainer, trainer_dir: Path, stage: str):
    """``trainer.train()``, resumed from the latest complete checkpoint when there is one."""
    ckpt = latest(trainer_dir)
    if trainer.args.world_size > 1:
        print(f"{stage}: rank {trainer.args.process_index} of world size {trainer.args.world_size} "
              f"({trainer.args.parallel_mode.value}, {trainer.accelerator.state.backend})", flush=True)
    if ckpt is not None:
        print(f"{stage}: resuming from {ckpt} (global step {step_of(ckpt)})", flush=True)
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    print(f"{stage}: trained steps {step_of(ckpt) + 1}..{trainer.state.global_step} in this run", flush=True)
    return result


def finish(work: Path) -> None:
    """Remove the work dir once every rank is done with it (the artifact is in place)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if is_main_process():
        shutil.rmtree(work, ignore_errors=True)


class CsvLogCallback(TrainerCallback):
    """Append one row per training log to a CSV (rank 0 only): the step, the loss, the learning
    rate and, for a DPO trainer, TRL's ``rewards/margins`` (mean β·h over the logging window) and
    ``rewards/accuracies`` (the fraction of pairs with chosen reward > rejected); empty for SFT.

    ``resume_step``: keep the rows a previous run logged up to that step (the checkpoint it
    resumes from) and drop the later ones, which this run trains again.
    """

    HEADER = ["step", "loss", "lr", "reward_margin", "reward_accuracy"]
    LOG_KEYS = {"lr": "learning_rate", "reward_margin": "rewards/margins", "reward_accuracy": "rewards/accuracies"}

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        if not is_main_process():
            return
        rows = []
        if resume_step and self.path.is_file():
            with open(self.path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if r and int(r["step"]) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, self.HEADER, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.is_world_process_zero:
            row = [state.global_step, logs["loss"], *(logs.get(key, "") for key in self.LOG_KEYS.values())]
            with open(self.path, "a", newline="") as fh:
                csv.writer(fh).writerow(row)
