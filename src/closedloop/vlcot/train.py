"""Fine-tuning on chains (SPEC §6): SFT on gold chains and the rejection rounds' fine-tuning on
kept chains, both through :class:`VLCoTTrainer`, a ``transformers.Trainer`` whose loss is the
model's L_text + L_vision (:class:`~closedloop.vlcot.model.VLCoTModel`), with the arguments of
:func:`closedloop.training.trainer_args` and resumable checkpoints (:mod:`closedloop.checkpoints`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from datasets import Dataset
from transformers import Trainer, set_seed

from closedloop import checkpoints, training
from closedloop.checkpoints import CsvLogCallback
from closedloop.vlcot import chains


class ChainCollator:
    """Batches of chains (:func:`~closedloop.vlcot.chains.encode`) with their images; dataset rows
    carry only an index into ``examples`` = [(question row, completion ids, looks)]."""

    def __init__(self, examples: list[tuple[dict, list[int], list[list[int]]]], processor, data: Path, ids: dict,
                 n_patches: int):
        self.examples, self.processor, self.data, self.ids, self.n_patches = examples, processor, data, ids, n_patches

    def __call__(self, features: list[dict]) -> dict:
        picked = [self.examples[f["idx"]] for f in features]
        tok = self.processor.tokenizer
        enc = [chains.encode(chains.prompt_ids(tok, row["question"], self.n_patches, self.ids["image"]), completion,
                             looks, self.ids, self.n_patches) for row, completion, looks in picked]
        return chains.collate(enc, chains.load_images(self.processor, self.data, [row for row, _, _ in picked]),
                              self.ids["pad"])


class VLCoTTrainer(Trainer):
    """``transformers.Trainer`` on :class:`~closedloop.vlcot.model.VLCoTModel`: the loss is the one its
    forward returns (L_text, plus L_BCE + λ·L_Dice + α·R_ent when it has the vision head)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]


def n_patches(model) -> int:
    v = model.llava.config.vision_config
    return (v.image_size // v.patch_size) ** 2


def fit(cfg, model, processor, examples, data: Path, t, work: Path, stage: str, bf16) -> VLCoTTrainer:
    """Train ``model`` on ``examples`` with the settings ``t`` (a TrainArgs section), checkpointed in
    ``work/trainer`` and resumed from there after a requeue; the running log is ``work/train_log.csv``."""
    set_seed(cfg.seed)
    model.train()
    resume_step = checkpoints.step_of(checkpoints.latest(work / "trainer"))
    trainer = VLCoTTrainer(
        model=model,
        args=training.trainer_args("sft", t, work / "trainer", cfg.seed, bf16, remove_unused_columns=False,
                                   dataloader_pin_memory=False, gradient_checkpointing=False),
        train_dataset=Dataset.from_list([{"idx": i} for i in range(len(examples))]),
        data_collator=ChainCollator(examples, processor, data, model.ids, n_patches(model)),
        callbacks=[CsvLogCallback(work / "train_log.csv", resume_step)],
    )
    checkpoints.train(trainer, work / "trainer", stage)
    shutil.rmtree(work / "trainer", ignore_errors=True)
    model.eval()
    return trainer
