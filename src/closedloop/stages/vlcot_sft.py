"""Stage ``vlcot_sft``: SFT of the LLaVA on gold chains (SPEC §6), one variant per job
(``job.model``): ``direct`` (the answer alone), ``text`` (text-only chains, no vision head) or
``vision`` (interleaved chains, teacher-forced with the gold patches, text + vision head).

Output ``results/<experiment>/vlcot/sft/<variant>/``: ``model/`` (from_pretrained dir with its
processor), ``vision_head.safetensors`` (``vision``), ``train_log.csv``, ``stats.json``.
"""

from __future__ import annotations

import json
import shutil

from closedloop import artifacts, checkpoints, paths
from closedloop import config as cl_config
from closedloop.config.vlcot import SFT_VARIANTS
from closedloop.vlcot import chains
from closedloop.vlcot import model as vm
from closedloop.vlcot.train import fit


def main(cfg) -> None:
    """Fine-tune the base LLaVA on the training questions' gold chains of variant ``job.model``."""
    variant = cfg.job.model
    if variant not in SFT_VARIANTS:
        raise cl_config.ConfigError(f"vlcot_sft: key 'job.model': expected direct, text or vision, got {variant!r}")
    data, out_dir, v = paths.vlcot_data_dir(cfg), paths.vlcot_sft_dir(cfg, variant), cfg.vlcot
    rows = artifacts.read_jsonl(data / "train.jsonl")
    view = cl_config.stage_view(cfg, "vlcot_sft", model=variant)
    work = checkpoints.work_dir(out_dir, view, {"data": data})
    with artifacts.artifact_dir(out_dir, "vlcot_sft", view, {"data": data}, cfg.seed) as out:
        model, processor = vm.load(vm.base_source(v.model), v.model, v.head, with_head=variant == "vision")
        vm.freeze_and_lora(model, v.model)
        examples = [(r, *chains.gold_chain(processor.tokenizer, r, variant, model.ids["look"])) for r in rows]
        trainer = fit(cfg, model, processor, examples, data, v.sft, work, "vlcot_sft", v.model.bf16_training)
        vm.save(model, processor, out)
        shutil.copyfile(work / "train_log.csv", out / "train_log.csv")
        (out / "stats.json").write_text(json.dumps({"variant": variant, "chains": len(examples),
                                                    "steps": trainer.state.global_step}, indent=2) + "\n")
    checkpoints.finish(work)
    print(f"vlcot_sft: {variant}: {len(examples)} chains, {trainer.state.global_step} steps -> {out_dir}")
