"""Stage ``sft``: supervised fine-tuning on gold step-by-step solutions with TRL's
SFTTrainer (full or LoRA through PEFT); loss on the assistant completion only.

Output ``results/<experiment>/sft/``: ``model/`` (a ``from_pretrained`` dir, LoRA merged
by default) and ``train_log.csv`` (step, loss, lr).
"""

from __future__ import annotations

from datasets import Dataset
from transformers import set_seed

from closedloop import artifacts, checkpoints, models, paths, prompts, training
from closedloop import config as cl_config
from closedloop.checkpoints import CsvLogCallback


def train_examples(cfg) -> Dataset:
    rows = artifacts.read_jsonl(paths.data_dir(cfg, cfg.sft.task) / "train.jsonl")
    if not rows:
        raise cl_config.ConfigError(
            f"key 'sft.task': task {cfg.sft.task!r} has no training rows (set data.tasks.{cfg.sft.task}.n_train > 0)"
        )
    return Dataset.from_list([prompts.sft_example(r) for r in rows])


def main(cfg) -> None:
    """Fine-tune the base model on ``cfg.sft.task``'s training split."""
    from trl import SFTTrainer

    set_seed(cfg.seed)
    dataset = train_examples(cfg)
    model, tokenizer = models.load_base(cfg.model)
    tokenizer.padding_side = "right"
    if cfg.model.lora.enabled:
        model = models.add_lora(model, cfg.model.lora)
    view = cl_config.stage_view(cfg, "sft", [cfg.sft.task])
    data = paths.data_dir(cfg, cfg.sft.task)
    work = checkpoints.work_dir(paths.sft_dir(cfg), view, {"data": data})  # survives a requeue: checkpoints, log
    resume_step = checkpoints.step_of(checkpoints.latest(work / "trainer"))
    with artifacts.artifact_dir(paths.sft_dir(cfg), "sft", view, {"data": data}, cfg.seed) as out:
        trainer = SFTTrainer(
            model=model, args=training.trainer_args(
                "sft", cfg.sft, work / "trainer", cfg.seed, cfg.model.bf16_training, max_length=cfg.sft.max_length,
                train_sampling_strategy="group_by_length" if cfg.sft.group_by_length else "random",
                completion_only_loss=True), train_dataset=dataset,
            processing_class=tokenizer, callbacks=[CsvLogCallback(work / "train_log.csv", resume_step)],
        )
        checkpoints.train(trainer, work / "trainer", "sft")
        lora = cfg.model.lora
        if checkpoints.is_main_process():
            models.save_policy(trainer.model, tokenizer, out / "model", lora.enabled and lora.merge_after_training)
            training.save_logs(work, out)
    checkpoints.finish(work)
    print(f"sft: {len(dataset)} examples, {trainer.state.global_step} steps (bf16 autocast: {trainer.args.bf16})"
          f" -> {paths.sft_dir(cfg)}")
