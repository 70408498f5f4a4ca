"""COrAL training (SPEC §5): a ``transformers.Trainer`` subclass whose loss is the forward
multi-token objective on the clean batch plus the backward reconstruction objective on a
corrupted copy of it (:mod:`closedloop.coral.objective`), and the two stages' parameter
choices.

Stage 1 trains the last layer + lm_head (the reference's ``--tune_final_layer_only
--tune_lm_head``: ``model.layers.{N−1}.*`` and ``lm_head``; the embeddings, layers 0..N−2 and
the final norm stay frozen). SmolLM2 ties lm_head to the input embeddings, so "train lm_head,
freeze the embeddings" cannot hold as stated: we untie first (lm_head gets its own copy,
``tie_word_embeddings: false``, +V·D parameters in the saved dir) so the frozen backbone sees
exactly its old inputs. Stage 2 trains the whole model (the reference's stage 2-2; its 2-1
"backbone only" pass is not implemented).

The corruption draws from torch's global RNG, which the Trainer saves in each checkpoint and
restores on resume, so a resumed run corrupts the same way.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from closedloop import prompts
from closedloop.coral.objective import objective_inputs


def tokenize(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """(input_ids, prompt_len) per training row: the chat prompt, then the assistant's
    solution as the chat template writes it (ends with the EOS), cut at ``max_length``."""
    out = []
    for row in rows:
        example = prompts.sft_example(row)
        prompt = prompts.chat_prompt(tokenizer, row)
        full = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(f"chat template: the conversation of row {row.get('id')!r} does not start "
                             "with its generation prompt")
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        ids = (p_ids + c_ids)[:max_length]
        out.append({"input_ids": ids, "prompt_len": min(len(p_ids), len(ids))})
    return out


class Collator:
    """Right padding with the pad id; lengths travel beside the ids (masks come from them)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), T), self.pad_id, dtype=torch.long)
        for b, f in enumerate(features):
            ids[b, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
        return {"input_ids": ids, "lengths": torch.tensor([len(f["input_ids"]) for f in features]),
                "prompt_lens": torch.tensor([f["prompt_len"] for f in features])}


class CoralTrainer(Trainer):
    """``Trainer`` with the COrAL loss L = L_fwd + L_bwd (SPEC §5; weights 1, 1 as the reference).

    Logs ``loss_forward`` and ``loss_backward`` beside the Trainer's ``loss``."""

    def __init__(self, *args, w_f: int, w_b: int, max_chunk: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.w_f, self.w_b, self.max_chunk = w_f, w_b, max_chunk
        self._parts: dict[str, list[float]] = {"loss_forward": [], "loss_backward": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        device = inputs["input_ids"].device
        parts = objective_inputs(inputs["input_ids"].cpu(), inputs["prompt_lens"].cpu(), inputs["lengths"].cpu(),
                                 self.w_f, self.w_b, self.max_chunk)
        losses = {}
        for name, kwargs in parts.items():
            losses[name] = model(**{k: v.to(device) for k, v in kwargs.items()}).loss
            self._parts[f"loss_{name}"].append(float(losses[name].detach()))
        loss = losses["forward"] + losses["backward"]
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            for key, values in self._parts.items():
                if values:
                    logs[key] = round(sum(values) / len(values), 4)
                values.clear()
        super().log(logs, *args, **kwargs)


def set_trainable(model, stage: int) -> dict[str, int]:
    """Stage 1: only ``model.layers.{N−1}.*`` and lm_head (untied first); stage 2: everything.
    Returns the trainable and total parameter counts."""
    from closedloop.coral.model import untie_lm_head

    if stage == 1:
        untie_lm_head(model)
        last = f"model.layers.{len(model.model.layers) - 1}."
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith(last) or name.startswith("lm_head.")
    else:
        for param in model.parameters():
            param.requires_grad = True
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


def train_stage(cfg, stage: int) -> None:
    """Run COrAL training stage ``stage`` (1 or 2) into ``paths.coral_stage_dir(cfg, stage)``:
    resumable through :mod:`closedloop.checkpoints` (a work dir keyed by the stage's config view),
    LoRA through PEFT when ``model.lora.enabled`` (merged before saving when configured)."""
    import json
    import shutil
    import time

    from datasets import Dataset
    from transformers import set_seed

    from closedloop import artifacts, checkpoints, models, paths, training
    from closedloop import config as cl_config
    from closedloop.checkpoints import CsvLogCallback
    from closedloop.coral.model import load, mark
    from closedloop.coral.objective import backward_window

    started = time.perf_counter()
    name, c = f"coral_stage{stage}", cfg.coral
    set_seed(cfg.seed)
    tag = paths.coral_input_tag(cfg)
    source = paths.model_dir(cfg, tag) if stage == 1 else paths.coral_stage_dir(cfg, 1) / "model"
    data = paths.data_dir(cfg, c.task)
    rows = artifacts.read_jsonl(data / "train.jsonl")
    if not rows:
        raise cl_config.ConfigError(f"key 'coral.task': task {c.task!r} has no training rows "
                                    f"(set data.tasks.{c.task}.n_train > 0)")
    tokenizer = models.load_tokenizer(str(source), cfg.model)
    model = load(source, models.DTYPES[models.dtype_name(cfg.model, inference=False)])
    w_f, w_b = c.window, backward_window(c.window, c.n_back_pred)
    mark(model, w_f, w_b)
    counts = set_trainable(model, stage)
    if cfg.model.lora.enabled:
        model = models.add_lora(model, cfg.model.lora)
    model.train()
    dataset = Dataset.from_list(tokenize(tokenizer, rows, c.max_length))
    out_dir = paths.coral_stage_dir(cfg, stage)
    view = cl_config.stage_view(cfg, name, [c.task], model=tag)
    work = checkpoints.work_dir(out_dir, view, {"data": data, "model": source})
    resume_step = checkpoints.step_of(checkpoints.latest(work / "trainer"))
    t = c[f"stage{stage}"]
    with artifacts.artifact_dir(out_dir, name, view, {"data": data, "model": source}, cfg.seed) as out:
        trainer = CoralTrainer(
            model=model, args=training.trainer_args(
                "sft", t, work / "trainer", cfg.seed, cfg.model.bf16_training, remove_unused_columns=False,
                dataloader_pin_memory=False),
            train_dataset=dataset, data_collator=Collator(tokenizer.pad_token_id), processing_class=tokenizer,
            callbacks=[CsvLogCallback(work / "train_log.csv", resume_step)], w_f=w_f, w_b=w_b,
            max_chunk=c.max_chunk)
        checkpoints.train(trainer, work / "trainer", name)
        if checkpoints.is_main_process():
            trained = trainer.model
            if cfg.model.lora.enabled and cfg.model.lora.merge_after_training:
                trained = trained.merge_and_unload()
            trained.save_pretrained(out / "model", safe_serialization=True)
            tokenizer.save_pretrained(out / "model")
            shutil.copyfile(work / "train_log.csv", out / "train_log.csv")
            stats = {"input": str(source), "input_tag": tag, "examples": len(dataset),
                     "steps": trainer.state.global_step, "w_f": w_f, "w_b": w_b, **counts,
                     "seconds": round(time.perf_counter() - started, 1)}
            (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    checkpoints.finish(work)
    print(f"{name}: {len(dataset)} examples, {trainer.state.global_step} steps, {counts['trainable']} of "
          f"{counts['total']} parameters trained -> {out_dir}")
