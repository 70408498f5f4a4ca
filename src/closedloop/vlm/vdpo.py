"""Vision-guided DPO (V-DPO, SPEC §4) on TRL's DPOTrainer.

Per token, the policy's log-probability is replaced by its classifier-free-guidance form

    log π̃(y|v,x) = γ·log πθ(y|v,x) − (γ−1)·sg(log πθ(y|∅,x)),

∅ = the null image (a zero ``pixel_values`` tensor: the all-mean image after the
processor's normalisation), sg = stop-gradient. The DPO loss uses log π̃ for the policy
terms; the reference keeps plain log π_ref(y|v,x). γ = 1 is plain DPO; at γ = 0 the
policy terms are constants and the loss has no gradient (SPEC §4's caution, tested).

:class:`VisionGuidedDPOTrainer` subclasses :class:`~closedloop.cdpo.ConservativeDPOTrainer`
(itself TRL's ``DPOTrainer``): TRL builds the batches, runs the policy and reference
forwards and computes the sigmoid loss; a forward hook on the policy swaps its per-token
log-probs for the guided ones (one extra no-grad forward with the null image), so the loss
TRL computes is the V-DPO loss, and a per-pair ``alpha`` column adds SPEC §4's label
smoothing exactly as cDPO does (SPEC §3: + α·β·h, h from the guided log-probs).

Image-contrast pairs (same x and y, original image v_w vs edited v_l) come in through
:class:`ImageContrastCollator`: TRL's vision collator repeats each prompt image for the
chosen and the rejected rows; for a pair with a ``rejected_image`` the rejected row's
pixels are replaced by the edited image's, for the policy and the reference alike (the
null-image pass replaces every image by ∅ anyway).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from datasets import Dataset, Image, List
from transformers import set_seed

from closedloop import artifacts, checkpoints, training
from closedloop.cdpo import ConservativeDPOTrainer
from closedloop.checkpoints import CsvLogCallback
from closedloop.vlm import model as vlm
from closedloop.vlm import pope


class ImageContrastCollator:
    """TRL's vision preference collator, with the rejected rows' image swapped per pair.

    Examples carry ``images`` ([PIL image]) and ``rejected_images`` ([PIL image] for an
    image-contrast pair, [] for a response-contrast pair).
    """

    def __init__(self, collator, processor):
        self.collator = collator
        self.processor = processor

    def __call__(self, examples: list[dict]) -> dict:
        rejected = [e.get("rejected_images") or [] for e in examples]
        batch = self.collator([{k: v for k, v in e.items() if k != "rejected_images"} for e in examples])
        swap = [i for i, imgs in enumerate(rejected) if imgs]
        if swap:
            pixels = self.processor.image_processor(images=[rejected[i][0] for i in swap],
                                                    return_tensors="pt")["pixel_values"]
            values = batch["pixel_values"].clone()
            values[[len(examples) + i for i in swap]] = pixels.to(values.dtype)
            batch["pixel_values"] = values
        return batch


class VisionGuidedDPOTrainer(ConservativeDPOTrainer):
    """TRL DPOTrainer with SPEC §4's vision-guided policy log-probs (γ) and optional per-pair α."""

    def __init__(self, *args, gamma: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if self.ref_model is None and float(gamma) != 1.0:
            raise ValueError("VisionGuidedDPOTrainer: pass a ref_model (with γ != 1 the policy's forward hook would "
                             "also guide a reference computed by the policy itself)")
        self.gamma = float(gamma)
        self._policy_module = self.accelerator.unwrap_model(self.model)
        self._in_null_pass = False
        self.data_collator = ImageContrastCollator(self.data_collator, self.processing_class)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "rejected_images" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "rejected_images"]

    def _capture_log_probs(self, module, args, kwargs, output):
        """Forward hook: guide the policy's log-probs (SPEC §4), then let cDPO capture them."""
        if self._in_null_pass or not kwargs.get("fused_lm_head"):
            return None
        if module is self._policy_module and self.gamma != 1.0:
            null_kwargs = dict(kwargs, pixel_values=torch.zeros_like(kwargs["pixel_values"]))
            self._in_null_pass = True
            try:
                with torch.no_grad():
                    null_log_probs = module(*args, **null_kwargs).log_probs
            finally:
                self._in_null_pass = False
            output.log_probs = self.gamma * output.log_probs - (self.gamma - 1.0) * null_log_probs.detach()
        if self._captured is not None:
            self._captured.append(output.log_probs)
        return output


def guided_log_prob(log_p: torch.Tensor, log_p_null: torch.Tensor, gamma: float) -> torch.Tensor:
    """The SPEC §4 formula itself: γ·log πθ(y|v,x) − (γ−1)·sg(log πθ(y|∅,x))."""
    return gamma * log_p - (gamma - 1.0) * log_p_null.detach()


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


def gammas_of(cfg, variant: str) -> list[float]:
    """The γ values the job trains: 1 for ``dpo``; ``gamma_grid`` (else ``gamma``) for ``vdpo``."""
    if variant == "dpo":
        return [1.0]
    return [float(g) for g in cfg.vlm.vdpo.gamma_grid] or [float(cfg.vlm.vdpo.gamma)]


VAL_BATCH_SIZE = 32


VAL_MAX_NEW_TOKENS = 8


def validation_score(model, processor, data: Path) -> dict:
    """POPE metrics of ``model`` on ``val.jsonl`` (training-split images kept out of SFT and pairs)."""
    rows = artifacts.read_jsonl(data / "val.jsonl")
    model.eval()
    generations = pope.generate(model, processor, rows, data, VAL_BATCH_SIZE, VAL_MAX_NEW_TOKENS)
    answers = [pope.parse_answer(g) for g in generations]
    return {"n": len(rows), **pope.metrics_from_confusion(pope.confusion([r["label"] for r in rows], answers))}


def degenerate(val: dict) -> bool:
    """An all-"yes" or all-"no" model on the validation questions (yes-ratio 1 or 0): it answers
    from the question alone, whatever its accuracy on a set that happens to be unbalanced."""
    return val["yes_ratio"] in (0.0, 1.0)


def best_gamma(table: list[dict]) -> dict:
    """The row with the highest validation accuracy among the non-degenerate ones (:func:`degenerate`);
    ties go to higher F1, then to the γ listed first. When every γ gave a degenerate model the same
    rule runs over all rows (the stage records and reports that; there is nothing better to keep).

    Accuracy rather than F1: on a balanced set answering "yes" to everything scores F1 66.7
    (accuracy 50), so F1 alone would choose a degenerate model; issue 22's collapsed run had every γ
    at 50.0 validation accuracy, all "no"."""
    candidates = [(i, r) for i, r in enumerate(table) if not degenerate(r["val"])] or list(enumerate(table))
    return max(candidates, key=lambda it: (round(it[1]["val"]["accuracy"], 6), round(it[1]["val"]["f1"], 6),
                                           -it[0]))[1]


def nll_loss(weight: float) -> dict:
    """TRL's loss settings: sigmoid DPO, plus RPO's NLL term on the chosen answer at ``weight`` > 0."""
    if weight > 0:
        return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, float(weight)]}
    return {"loss_type": ["sigmoid"]}


def train_one(cfg, gamma: float, rows, pairs: Path, data: Path, sft: Path, with_alpha: bool, work: Path):
    """One (V-)DPO run from the SFT model, checkpointed into ``work/trainer`` and resumed from
    there after a requeue (:mod:`closedloop.checkpoints`); returns the trainer (its model trained)."""
    set_seed(cfg.seed)
    model, processor = vlm.load(sft, cfg.vlm.model)
    ref_model, _ = vlm.load(sft, cfg.vlm.model)
    vlm.freeze_vision_tower(model, cfg.vlm.model)
    model = vlm.add_lora(model, cfg.vlm.model)  # the reference stays the plain SFT model
    model.train()
    d = cfg.vlm.vdpo
    resume_step = checkpoints.step_of(checkpoints.latest(work / "trainer"))
    trainer = VisionGuidedDPOTrainer(
        model=model, ref_model=ref_model, gamma=gamma,
        args=training.trainer_args("dpo", d, work / "trainer", cfg.seed, cfg.vlm.model.bf16_training, section="vlm.vdpo",
                                   beta=d.beta,
                                   **nll_loss(d.nll_weight), max_length=None, precompute_ref_log_probs=False,
                                   dataloader_pin_memory=False),
        train_dataset=preference_dataset(rows, pairs, data, processor.tokenizer.eos_token, with_alpha),
        processing_class=processor, callbacks=[CsvLogCallback(work / "train_log.csv", resume_step)],
    )
    checkpoints.train(trainer, work / "trainer", "vdpo")
    shutil.rmtree(work / "trainer", ignore_errors=True)
    return trainer, processor
