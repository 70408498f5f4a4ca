"""Stage ``vlm_sft``: supervised fine-tuning of the LLaVA on easy-VQA (SPEC §4's SFT model):
the vision phase, then TRL's ``SFTTrainer`` (:mod:`closedloop.vlm.vision`).

Output ``results/<experiment>/vlm/sft/``: ``model/`` (from_pretrained dir with processor),
``train_log.csv``, ``vision_log.csv``, ``heads.safetensors``, ``stats.json`` (with the vision heads'
held-out accuracy and the grounding check, :mod:`closedloop.vlm.grounding`) and, with
``vlm.sft.grounding_every``, ``grounding_log.csv`` (the check during training).

With ``vlm.sft.restart_below`` the trained model is scored on the validation questions and, below the
threshold, SFT runs again from the same vision tower with seed + 1000·k (``vlm.sft.restarts`` times at
most); the attempt with the best validation accuracy is kept (``stats.json``: ``attempts``,
``kept_attempt``). Whether presence answers leave their all-yes/all-no plateau in time varies with the
seed (docs/results.md), so a second draw is the cheap fix; held-out questions are never looked at.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import set_seed

from closedloop import artifacts, checkpoints, paths, training
from closedloop import config as cl_config
from closedloop.checkpoints import CsvLogCallback
from closedloop.vlm import grounding
from closedloop.vlm import model as vlm
from closedloop.vlm.vdpo import validation_score
from closedloop.vlm.vision import (
    heldout_accuracy,
    pixel_values,
    pretrain_vision,
    sft_dataset,
    sft_trainer_class,
    standardize_vision_output,
)

RESTART_SEED_STRIDE = 1000
"""Attempt k of ``vlm.sft.restart_below`` trains with seed ``cfg.seed + 1000·k``."""


def main(cfg) -> None:
    """Fine-tune the configured LLaVA on the easy-VQA SFT rows of ``vlm_data``, on
    ``vlm.sft.cpu_threads`` torch threads (the summation order decides whether SFT grounds).

    Resumable after a requeue: the model after the vision phase and the SFT checkpoints live in
    a work dir keyed by the config view (:mod:`closedloop.checkpoints`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.vlm.sft.cpu_threads or threads)
    try:
        fine_tune(cfg)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (tests) keeps its own


def fine_tune(cfg) -> None:
    """:func:`main` (SPEC §4's SFT model) on the threads it set."""
    set_seed(cfg.seed)
    data, out_dir, mcfg = paths.vlm_data_dir(cfg), paths.vlm_sft_dir(cfg), cfg.vlm.model
    rows = artifacts.read_jsonl(data / "sft.jsonl")
    backbone = text_dir(cfg)
    view = cl_config.stage_view(cfg, "vlm_sft", model=backbone)
    inputs = {"data": data, **({"text_backbone": backbone} if backbone else {})}
    work = checkpoints.work_dir(out_dir, view, inputs)
    with artifacts.artifact_dir(out_dir, "vlm_sft", view, inputs, cfg.seed) as out:
        standardized = vision_heldout = None
        if cl_config.enum_value(mcfg.kind) == "tiny" and cfg.vlm.sft.vision_pretrain_steps > 0:
            vision = vision_phase(cfg, data, work / "vision")
            start = vision / "model"
            for name in ("heads.safetensors", "vision_log.csv"):
                shutil.copyfile(vision / name, out / name)
            standardized = json.loads((vision / "standardized.json").read_text())
            vision_heldout = json.loads((vision / "heldout.json").read_text())
        else:
            start = vlm.base_source(mcfg, backbone)
        s, attempts, best = cfg.vlm.sft, [], None
        for k in range(s.restarts + 1):
            seed = cfg.seed + RESTART_SEED_STRIDE * k
            attempt_work = work if k == 0 else work / f"restart{k}"
            trainer, processor, selected = train_attempt(cfg, start, rows, data, attempt_work, seed)
            val = validation_score(trainer.model, processor, data) if s.restart_below > 0 else None
            attempts.append({"attempt": k, "seed": seed, "steps": trainer.state.global_step, "selected": selected,
                             "validation": val})
            if best is None or val["accuracy"] > best[0]["validation"]["accuracy"]:
                best = (attempts[-1], trainer, attempt_work)
            if val is None or val["accuracy"] >= s.restart_below:
                break
            print(f"vlm_sft: attempt {k} (seed {seed}): validation accuracy {val['accuracy']:.3f} < "
                  f"vlm.sft.restart_below {s.restart_below:g}"
                  + (f"; restarting with seed {seed + RESTART_SEED_STRIDE}" if k < s.restarts else "; no restarts left"),
                  flush=True)
        record, trainer, attempt_work = best
        if len(attempts) > 1:
            print(f"vlm_sft: kept attempt {record['attempt']} (seed {record['seed']}, validation accuracy "
                  f"{record['validation']['accuracy']:.3f})")
        vlm.save(trainer.model, processor, out / "model", mcfg.lora.merge_after_training)
        training.save_logs(attempt_work, out)
        if (attempt_work / "grounding_log.csv").is_file():
            shutil.copyfile(attempt_work / "grounding_log.csv", out / "grounding_log.csv")
        grounded = grounding_check(cfg, trainer.model, processor, data)
        (out / "stats.json").write_text(json.dumps(
            {"rows": len(rows), "steps": trainer.state.global_step, "vision_standardized": standardized,
             "vision_heldout": vision_heldout, "grounding": grounded, "selected": record["selected"],
             "validation": record["validation"], "attempts": attempts, "kept_attempt": record["attempt"],
             "torch_threads": torch.get_num_threads()},
            indent=2) + "\n")
    checkpoints.finish(work)
    print(f"vlm_sft: {len(rows)} rows, {trainer.state.global_step} steps -> {out_dir}")


def train_attempt(cfg, start, rows: list[dict], data, work, seed: int):
    """One SFT run from ``start`` (the model after the vision phase, or the base VLM) with LoRA's init
    and the data order drawn from ``seed``; checkpoints in ``work/trainer`` (resumable), logs in
    ``work``. With ``vlm.sft.keep_best`` the weights of the best grounding check are restored.
    Returns the trainer, the processor and keep_best's record (None without it)."""
    mcfg, s = cfg.vlm.model, cfg.vlm.sft
    model, processor = vlm.load(start, mcfg)
    vlm.freeze_vision_tower(model, mcfg)
    set_seed(seed)  # LoRA's init draws from the attempt's seed, vision phase run now or reused after a requeue
    model = vlm.add_lora(model, mcfg)
    model.train()
    resume_step = checkpoints.step_of(checkpoints.latest(work / "trainer"))
    callbacks = [CsvLogCallback(work / "train_log.csv", resume_step)]
    best_dir = work / "best" if s.keep_best and s.grounding_every and s.grounding_probes else None
    if s.grounding_every and s.grounding_probes:
        callbacks.append(grounding.GroundingLogCallback(grounding.model_generate(model, processor, data), data,
                                                        s.grounding_probes, s.grounding_every,
                                                        work / "grounding_log.csv", resume_step, model, best_dir))
    trainer = sft_trainer_class(rows)(
        model=model, args=training.trainer_args(
            "sft", s, work / "trainer", seed, mcfg.bf16_training, section="vlm.sft", max_length=None,
            completion_only_loss=True, remove_unused_columns=False, dataloader_pin_memory=False),
        train_dataset=sft_dataset(rows, data, processor.tokenizer.eos_token), processing_class=processor,
        callbacks=callbacks,
    )
    checkpoints.train(trainer, work / "trainer", "vlm_sft")
    selected = None
    if best_dir is not None:  # vlm.sft.keep_best: the checkpoint the validation probes liked best
        final = grounding.check(grounding.model_generate(trainer.model, processor, data), data, s.grounding_probes, 0.0)
        selected = grounding.restore_best(trainer.model, final, best_dir)
        print(f"vlm_sft: keep_best: {'step ' + str(selected['step']) if selected['restored'] else 'the final model'} "
              f"(validation probe accuracy {selected['accuracy']:.3f})")
    return trainer, processor, selected


def grounding_check(cfg, model, processor, data) -> dict | None:
    """:mod:`closedloop.vlm.grounding` on the trained model (``vlm.sft.grounding_probes`` pairs; 0: None),
    with a loud warning in the log below ``vlm.sft.grounding_threshold``."""
    s = cfg.vlm.sft
    if s.grounding_probes == 0:
        return None
    record = grounding.check(grounding.model_generate(model, processor, data), data, s.grounding_probes, s.grounding_threshold)
    rate = "n/a" if record["flip_rate"] is None else f"{100 * record['flip_rate']:.1f}%"
    print(f"vlm_sft: grounding check: {rate} of {record['n_pairs']} presence answers flip with the image")
    if (text := grounding.warning(record)) is not None:
        print(f"\n{'!' * 80}\nvlm_sft: {text}\n{'!' * 80}\n", flush=True)
    return record


def text_dir(cfg) -> str | None:
    """``vlm.model.text_backbone: loop_policy``: the closed loop's last policy (``job.model``, from
    the rule), whose weights become the VLM's language model; else None."""
    return cfg.job.model if cl_config.enum_value(cfg.vlm.model.text_backbone) == "loop_policy" else None


def vision_phase(cfg, data, vision):
    """Phase 1 (``kind: tiny``): train the vision tower from scratch on shape and colour, then
    standardize its output (:mod:`closedloop.vlm.vision`). Written to ``vision`` (the model,
    ``heads.safetensors``, ``vision_log.csv``, ``standardized.json``, ``heldout.json``: the heads'
    accuracy on the validation scenes) by atomic rename, so a requeued job skips it."""
    if (vision / "model").is_dir():
        print(f"vlm_sft: vision phase finished before the requeue, reused from {vision}")
        return vision
    model, processor = vlm.load(vlm.base_source(cfg.vlm.model, text_dir(cfg)), cfg.vlm.model)
    tmp = vision.with_name(vision.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    heads = pretrain_vision(model, processor, cfg, data, tmp / "vision_log.csv")
    scenes = [r for r in artifacts.read_jsonl(data / "scenes.jsonl") if r["split"] == "train"][:256]
    model.model.vision_tower.eval()
    standardized = standardize_vision_output(model.model.vision_tower, heads,
                                             pixel_values(processor, [data / r["image"] for r in scenes]))
    save_file({k: v.detach().contiguous() for k, v in heads.state_dict().items()}, tmp / "heads.safetensors")
    (tmp / "standardized.json").write_text(json.dumps(standardized))
    (tmp / "heldout.json").write_text(json.dumps(heldout_accuracy(model.model.vision_tower, heads, processor, data)))
    vlm.save(model, processor, tmp / "model")
    os.replace(tmp, vision)
    return vision
