"""The V-DPO branch's stages (SPEC §4) for real on the vlm_smoke config, in process, and the
`vdpo_all` target's DAG (Snakemake dry run)."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from closedloop import artifacts, config, models, paths, training
from closedloop.stages import pope, vdpo, vdpo_pairs, vlm_data, vlm_report, vlm_sft
from closedloop.vlm import grounding, vision
from closedloop.vlm import model as vlm
from closedloop.vlm import pope as pope_scoring
from closedloop.vlm import vdpo as vdpo_lib

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_the_branch_runs_end_to_end(tmp_path):
    cfg = config.load([ROOT / "configs" / "vlm_smoke.yaml"],
                      [f"data_dir={tmp_path / 'data'}", f"results_dir={tmp_path / 'results'}"])
    vlm_data.main(cfg)
    threads = torch.get_num_threads()
    vlm_sft.main(cfg)
    sft = paths.vlm_sft_dir(cfg)
    assert json.loads((sft / "stats.json").read_text())["torch_threads"] == cfg.vlm.sft.cpu_threads == 1
    assert torch.get_num_threads() == threads  # the caller's count comes back
    assert {p.name for p in sft.iterdir()} == {"config.yaml", "provenance.json", "model", "train_log.csv",
                                               "vision_log.csv", "heads.safetensors", "stats.json", "grounding_log.csv"}
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (sft / "model").iterdir())
    vision_log = (sft / "vision_log.csv").read_text().splitlines()
    assert vision_log[0] == "step,loss,shape_acc,color_acc" and len(vision_log) == 1 + 5
    base = load_file(Path(vlm.base_source(cfg.vlm.model)) / "model.safetensors")
    trained = load_file(sft / "model" / "model.safetensors")
    assert not torch.equal(base["vision_tower.embeddings.patch_embedding.weight"],
                           trained["vision_tower.embeddings.patch_embedding.weight"])
    stats = json.loads((sft / "stats.json").read_text())  # vlm.sft.restart_below: a new seed while below it
    attempts = stats["attempts"]
    assert [a["seed"] for a in attempts] == [cfg.seed + 1000 * k for k in range(len(attempts))]
    assert all(a["validation"]["n"] == 4 * 2 * 3 and a["steps"] == 3 for a in attempts)
    assert all(a["validation"]["accuracy"] < 0.8 for a in attempts[:-1])
    assert len(attempts) == 2 or attempts[-1]["validation"]["accuracy"] >= 0.8
    kept = max(attempts, key=lambda a: a["validation"]["accuracy"])  # ties: the earlier attempt
    assert stats["kept_attempt"] == kept["attempt"] and stats["validation"] == kept["validation"]

    vdpo_pairs.main(cfg)
    rows = artifacts.read_jsonl(paths.vdpo_pairs_dir(cfg) / "pairs.jsonl")
    assert len(rows) == 8 and all(0.0 <= r["alpha"] <= 0.5 for r in rows)
    image_rows = [r for r in rows if r["kind"] == "image"]
    assert len(image_rows) == 4 and {r["edit"]["kind"] for r in image_rows} == {"remove", "recolour"}
    assert all((paths.vdpo_pairs_dir(cfg) / r["rejected_image"]).is_file() and r["edit"]["pixels_changed"] > 0
               for r in image_rows)
    assert all(r["chosen"] == r["rejected"] for r in image_rows)
    assert all(r["chosen"] != r["rejected"] for r in rows if r["kind"] != "image")

    for variant in ("vdpo", "dpo"):
        cfg.job.variant = variant
        vdpo.main(cfg)
        stats = json.loads((paths.vdpo_dir(cfg, variant) / "stats.json").read_text())
        assert stats["steps"] == 2 and stats["alpha"]
        if variant == "dpo":
            assert stats["gamma"] == 1.0 and not (paths.vdpo_dir(cfg, variant) / "gamma_selection.json").exists()
        else:  # γ chosen on the validation questions among vlm.vdpo.gamma_grid
            selection = json.loads((paths.vdpo_dir(cfg, variant) / "gamma_selection.json").read_text())
            assert [r["gamma"] for r in selection["table"]] == [0.75, 0.5]
            assert all(r["val"]["n"] == 4 * 2 * 3 for r in selection["table"]) and selection["sft"]["n"] == 4 * 2 * 3
            assert selection["chosen"] == stats["gamma"] == vdpo_lib.best_gamma(selection["table"])["gamma"]
            assert selection["sft"] == kept["validation"]  # the saved SFT model is the kept attempt
            assert selection["all_degenerate"] == all(vdpo_lib.degenerate(r["val"]) for r in selection["table"])
            assert all((paths.vdpo_dir(cfg, variant) / "gamma" / f"{g:g}" / "train_log.csv").is_file()
                       for g in (0.75, 0.5))
        prov = json.loads((paths.vdpo_dir(cfg, variant) / "provenance.json").read_text())
        assert prov["inputs"]["pairs"]["sha256"] == artifacts.content_hash(paths.vdpo_pairs_dir(cfg))

    for tag in ("sft", "dpo", "vdpo"):
        cfg.job.model = tag
        pope.main(cfg)
        out = paths.pope_dir(cfg, tag)
        metrics = json.loads((out / "metrics.json").read_text())
        preds = artifacts.read_jsonl(out / "predictions.jsonl")
        assert metrics["all"]["n"] == len(preds) == 6 * 2 * 3
        assert set(metrics["splits"]) == {"random", "popular", "adversarial"}
        labels = [p["label"] for p in preds]
        answers = [pope_scoring.parse_answer(p["generation"]) for p in preds]
        assert metrics["all"]["confusion"] == pope_scoring.confusion(labels, answers)
        assert metrics["all"]["ci"]["f1"][0] <= metrics["all"]["f1"] <= metrics["all"]["ci"]["f1"][1]
    vlm_report.main(cfg)
    report = paths.vlm_report_file(cfg).read_text()
    assert all(f"| {t} | " in report for t in ("sft", "dpo", "vdpo")) and "| adversarial |" in report
    assert "| γ | val accuracy |" in report and "| 0.5 | " in report
    grounded = json.loads((sft / "stats.json").read_text())["grounding"]
    assert grounded["threshold"] == 0.5 and grounded["n_pairs"] == len(grounding.probe_rows(
        artifacts.read_jsonl(paths.vlm_data_dir(cfg) / "scenes.jsonl"), 100)) // 2 > 0
    assert "Grounding check of the SFT model" in report and '"What shape is in the image?"' in report
    assert json.loads((sft / "stats.json").read_text())["vision_heldout"]["n"] == 4  # the validation scenes
    assert ("> **WARNING: the SFT model's presence answers barely depend on the image" in report) == (
        not grounded["passed"])
    assert (paths.vlm_run_dir(cfg) / "report.provenance.json").is_file()


def test_a_cold_and_a_warm_model_cache_give_the_same_sft_model(tmp_path, monkeypatch):
    """vlm_sft builds the tiny LLaVA on a cache miss; the build must not change the stage's draws
    (issue 22: a cold cache gave another vision init, and another result, than a warm one), nor may
    the global RNG state the stage starts from."""
    monkeypatch.setenv("CLOSEDLOOP_CACHE", str(tmp_path / "cache"))
    cfg = config.load([ROOT / "configs" / "vlm_smoke.yaml"],
                      [f"data_dir={tmp_path / 'data'}", f"results_dir={tmp_path / 'results'}",
                       "vlm.model.lora.enabled=true", "vlm.model.lora.r=4",  # LoRA's init draws too
                       "vlm.sft.grounding_every=2",  # and generation during training must not disturb it
                       "vlm.sft.keep_best=true"])  # nor saving the best checkpoint
    vlm_data.main(cfg)
    sft = paths.vlm_sft_dir(cfg)
    assert not (tmp_path / "cache").exists()
    vlm_sft.main(cfg)  # cold: builds the base model
    assert any(p.name.startswith("tiny-llava-") for p in (tmp_path / "cache" / "models").iterdir())
    cold = artifacts.file_hashes(sft)
    shutil.rmtree(sft)
    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)  # whatever ran before in the process
    vlm_sft.main(cfg)  # warm
    assert artifacts.file_hashes(sft) == cold and "model/model.safetensors" in cold
    assert [r.split(",")[0] for r in (sft / "grounding_log.csv").read_text().splitlines()] == ["step", "2"]
    selected = json.loads((sft / "stats.json").read_text())["selected"]
    assert set(selected) == {"step", "accuracy", "flip_rate", "restored"}


def test_keep_best_restores_the_checkpoint_the_probes_liked_best(tmp_path):
    """vlm.sft.keep_best: the weights saved at the best check come back only when the final model
    scores lower on the validation probes (ties keep the final model)."""
    model = torch.nn.Linear(3, 2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    grounding.save_best(model, {"step": 4, "accuracy": 0.7, "flip_rate": 0.5}, tmp_path / "best")
    with torch.no_grad():
        model.weight.add_(1.0)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    kept = grounding.restore_best(model, {"accuracy": 0.7, "flip_rate": 0.1}, tmp_path / "best")
    assert kept == {"step": None, "accuracy": 0.7, "flip_rate": 0.1, "restored": False}
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)
    kept = grounding.restore_best(model, {"accuracy": 0.6, "flip_rate": 0.1}, tmp_path / "best")
    assert kept == {"step": 4, "accuracy": 0.7, "flip_rate": 0.5, "restored": True}
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)
    with pytest.raises(config.ConfigError, match="vlm.sft.keep_best"):
        config.load([ROOT / "configs" / "vlm_smoke.yaml"], ["vlm.sft.keep_best=true", "vlm.sft.grounding_every=0"])


def test_a_cache_build_leaves_the_callers_rng_alone(tmp_path):
    """models.build_once (LLM tiny/embedded and VLM tiny models): a build seeds and draws from the
    global RNGs; after it the caller draws what it would have drawn from a cache hit."""
    def draws():
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    def build(out):
        torch.manual_seed(7), random.seed(7), np.random.seed(7)
        torch.rand(5), random.random(), np.random.rand()
        out.mkdir()

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    models.build_once(tmp_path / "entry", build)  # miss: builds
    cold = draws()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    models.build_once(tmp_path / "entry", build)  # hit
    assert draws() == cold


SCENES = [{"split": "val", "image_id": 3, "image": "a.png", "shape": "circle", "color": "red"},
          {"split": "val", "image_id": 1, "image": "b.png", "shape": "circle", "color": "blue"},
          {"split": "val", "image_id": 2, "image": "c.png", "shape": "triangle", "color": "red"},
          {"split": "train", "image_id": 0, "image": "t.png", "shape": "rectangle", "color": "red"}]


def test_grounding_probes_flip_the_right_answer_and_are_scored_by_hand():
    rows = grounding.probe_rows(SCENES, 10)  # val scenes in id order: b (1), c (2), a (3); t is not val
    assert [(r["kind"], r["image"], r["question"], r["label"]) for r in rows] == [
        ("shape", "b.png", "Is there a circle in the image?", "yes"), ("shape", "c.png", "Is there a circle in the image?", "no"),
        ("color", "b.png", "Is there a blue circle in the image?", "yes"),
        ("color", "a.png", "Is there a blue circle in the image?", "no"),
        ("shape", "c.png", "Is there a triangle in the image?", "yes"), ("shape", "a.png", "Is there a triangle in the image?", "no"),
        # c has no same-shape partner in another colour: no colour probe
        ("shape", "a.png", "Is there a circle in the image?", "yes"), ("shape", "c.png", "Is there a circle in the image?", "no"),
        ("color", "a.png", "Is there a red circle in the image?", "yes"),
        ("color", "b.png", "Is there a red circle in the image?", "no")]
    assert len(grounding.probe_rows(SCENES, 2)) == 4
    # 5 pairs: flipped right, flipped wrong way, blind yes, blind no, flipped right
    answers = ["yes", "no", "no", "yes", "yes", "yes", "no", "no", "yes", "no"]
    r = grounding.flip_score(rows, answers, threshold=0.5)
    assert (r["n_pairs"], r["flip_rate"], r["pair_accuracy"], r["accuracy"], r["yes_ratio"]) == (5, 0.6, 0.4, 0.6, 0.5)
    assert r["kinds"]["color"]["flip_rate"] == 1.0 and r["kinds"]["color"]["pair_accuracy"] == 0.5
    assert r["kinds"]["shape"]["flip_rate"] == 1 / 3 and r["passed"]
    assert not grounding.flip_score(rows, answers, threshold=0.7)["passed"]
    assert grounding.flip_score([], [], 0.5)["passed"] is None


def test_grounding_check_flags_an_image_blind_model_and_passes_one_that_reads_the_image(tmp_path):
    """An image-blind LLaVA (the real tiny model with its projector zeroed: every image gives the
    language model the same zero features) never flips; a scripted model that answers from the
    scene it is shown always does."""
    cfg, model, processor = _tiny(tmp_path)
    vlm_data.main(cfg)
    data = paths.vlm_data_dir(cfg)
    with torch.no_grad():
        for p in model.model.multi_modal_projector.linear_2.parameters():
            p.zero_()
    blind = grounding.check(grounding.model_generate(model, processor, data), data, 100, 0.5)
    assert blind["n_pairs"] > 0 and blind["flip_rate"] == 0.0 and blind["passed"] is False
    assert "barely depend on the image" in grounding.warning(blind)

    scenes = {s["image"]: s for s in artifacts.read_jsonl(data / "scenes.jsonl")}

    def reads_the_image(rows):
        answers = []
        for r in rows:
            s = scenes[r["image"]]
            if r["question"] == "What shape is in the image?":
                answers.append(f"A {s['shape']}.")
                continue
            named = r["question"].removeprefix("Is there a ").removesuffix(" in the image?").split()
            answers.append("Yes." if named[-1] == s["shape"] and named[0] in (s["color"], s["shape"]) else "No.")
        return answers

    reading = grounding.check(reads_the_image, data, 100, 0.5)
    assert reading["flip_rate"] == reading["pair_accuracy"] == 1.0 and reading["passed"]
    assert reading["scene_questions"]["what_shape"] == 1.0 and reading["scene_questions"]["what_color"] == 0.0
    assert grounding.warning(reading) is None


def test_stage_views_are_narrow():
    cfg = config.load([ROOT / "configs" / "vlm_smoke.yaml"])
    assert set(config.stage_view(cfg, "vlm_data")["vlm"]) == {"data"}
    assert set(config.stage_view(cfg, "pope", model="sft")["vlm"]) == {"model", "data", "sft", "pope"}
    assert "vdpo" in config.stage_view(cfg, "pope", model="vdpo")["vlm"]
    cfg.vlm.pairs.alpha = "none"
    assert set(config.stage_view(cfg, "vdpo_pairs")["vlm"]) == {"data", "pairs"}


def test_vdpo_all_dag(repo_copy):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--configfile",
                          "configs/vlm_smoke.yaml", "--", "vdpo_all"], cwd=repo_copy, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    table = re.search(r"job\s+count\n[-\s]+\n(.*?)\ntotal", out.stdout, re.S)
    jobs = {m[0]: int(m[1]) for m in re.findall(r"(\w+)\s+(\d+)", table.group(1))}
    assert jobs == {"vlm_data": 1, "vlm_sft": 1, "vdpo_pairs": 1, "vdpo": 2, "pope": 3,
                    "vlm_report": 1, "vdpo_all": 1}
    assert "results/vlm_smoke/vlm/vdpo" in out.stdout and "results/vlm_smoke/vlm/dpo" in out.stdout


def test_vdpo_over_seeds_shares_the_data_and_seed_0_is_the_single_run(repo_copy):
    """``seeds: [0, 1]`` (issue 22 part 5): the branch's data once, its training and evaluation once per
    seed (rules seed<k>_*), then the report over seeds; run for real, seed 0's models, pairs and answers
    are byte-identical to a single run's, and the report's per-seed scores are the seeds' own."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("CLOSEDLOOP_LAUNCH_CONFIG", None)
    env.pop("CLOSEDLOOP_LAUNCHER", None)

    def snakemake(*args):
        out = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile",
                              "configs/vlm_smoke.yaml", *args], cwd=repo_copy, env=env, capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    plan = snakemake("-n", "--config", "seeds=[0, 1, 2]", "--", "vdpo_all")
    table = re.search(r"job\s+count\n[-\s]+\n(.*?)\ntotal", plan.stdout, re.S)
    jobs = {m[0]: int(m[1]) for m in re.findall(r"(\w+)\s+(\d+)", table.group(1))}
    per_seed = {"vlm_sft": 1, "vdpo_pairs": 1, "vdpo": 2, "pope": 3, "vlm_report": 1}
    assert jobs == {"vlm_data": 1, "vlm_seeds_report": 1, "vdpo_all": 1,
                    **{f"seed{s}_{rule}": n for s in range(3) for rule, n in per_seed.items()}}

    snakemake("--config", "seeds=[0, 1]", "--", "vdpo_all")
    # the single run on the same data (its view lacks the seeds marker, so only mtime may rerun the data)
    snakemake("--rerun-triggers", "mtime", "--config", "results_dir=single", "--", "vdpo_all")
    seeded, single = repo_copy / "results" / "vlm_smoke", repo_copy / "single" / "vlm_smoke"
    for rel in ["sft/model/model.safetensors", "pairs/pairs.jsonl", "dpo/model/model.safetensors",
                "vdpo/model/model.safetensors", "pope/vdpo/predictions.jsonl"]:
        assert (seeded / "seed0" / "vlm" / rel).read_bytes() == (single / "vlm" / rel).read_bytes(), rel
    agg = json.loads((seeded / "vlm" / "seeds.json").read_text())
    for s in (0, 1):
        for tag in ("sft", "dpo", "vdpo"):
            own = json.loads((seeded / f"seed{s}" / "vlm" / "pope" / tag / "metrics.json").read_text())
            assert agg["metrics"][tag]["accuracy"]["per_seed"][str(s)] == own["all"]["accuracy"]
        attempts = json.loads((seeded / f"seed{s}" / "vlm" / "sft" / "stats.json").read_text())["attempts"]
        assert agg["sft"][str(s)]["attempts"] == len(attempts) and attempts[0]["seed"] == s
    report = (seeded / "vlm" / "report.md").read_text()
    assert "over seeds 0, 1" in report and "| vdpo | " in report and "## SFT per seed" in report


def test_paper_preset_keeps_the_hub_model():
    cfg = config.load([ROOT / "configs" / "paper" / "vdpo_llava7b.yaml"])
    assert cfg.vlm.model.kind == config.VLMKind.hf and cfg.vlm.model.name_or_path == "llava-hf/llava-1.5-7b-hf"
    assert (cfg.vlm.vdpo.gamma, cfg.vlm.vdpo.beta, cfg.vlm.vdpo.learning_rate) == (0.75, 0.1, 1e-6)
    assert cfg.vlm.vdpo.batch_size * cfg.vlm.vdpo.grad_accum == 64 and cfg.vlm.vdpo.epochs == 4
    assert not cfg.vlm.model.trust_remote_code
    assert cfg.vlm.model.lora.enabled and cfg.vlm.model.lora.r == 128
    assert cfg.vlm.data.n_train_images + cfg.vlm.data.n_val_images <= 3837  # easy-VQA's train scenes


def test_best_gamma_prefers_accuracy_over_an_all_yes_f1():
    table = [{"gamma": 0.5, "val": {"accuracy": 0.5, "f1": 0.667, "yes_ratio": 1.0}},
             {"gamma": 0.75, "val": {"accuracy": 0.8, "f1": 0.78, "yes_ratio": 0.5}},
             {"gamma": 1.5, "val": {"accuracy": 0.8, "f1": 0.75, "yes_ratio": 0.45}}]
    assert vdpo_lib.best_gamma(table)["gamma"] == 0.75
    assert vdpo_lib.best_gamma(table[2:] + table[1:2])["gamma"] == 0.75


def test_best_gamma_refuses_an_all_no_model_while_another_remains():
    """On an unbalanced validation set an all-"no" model can be the most accurate; it is refused
    while a γ that answers from the image remains, and kept (flagged by the stage) only when none does."""
    table = [{"gamma": 0.5, "val": {"accuracy": 0.7, "f1": 0.0, "yes_ratio": 0.0}},
             {"gamma": 0.75, "val": {"accuracy": 0.6, "f1": 0.55, "yes_ratio": 0.4}}]
    assert vdpo_lib.best_gamma(table)["gamma"] == 0.75
    collapsed = [{"gamma": 0.5, "val": {"accuracy": 0.5, "f1": 0.0, "yes_ratio": 0.0}},
                 {"gamma": 0.75, "val": {"accuracy": 0.5, "f1": 0.667, "yes_ratio": 1.0}}]
    assert vdpo_lib.best_gamma(collapsed)["gamma"] == 0.75  # the old rule: accuracy, then F1
    cfg = config.load([ROOT / "configs" / "vlm_smoke.yaml"])
    assert vdpo_lib.gammas_of(cfg, "dpo") == [1.0] and vdpo_lib.gammas_of(cfg, "vdpo") == [0.75, 0.5]
    cfg.vlm.vdpo.gamma_grid = []
    assert vdpo_lib.gammas_of(cfg, "vdpo") == [0.75]


def _tiny(tmp_path, *overrides):
    cfg = config.load([ROOT / "configs" / "vlm_smoke.yaml"],
                      [f"data_dir={tmp_path / 'data'}", f"results_dir={tmp_path / 'results'}", *overrides])
    return cfg, *vlm.load(vlm.base_source(cfg.vlm.model), cfg.vlm.model)


def test_standardized_vision_output_is_centred_unit_scale_and_keeps_the_heads(tmp_path):
    cfg, model, processor = _tiny(tmp_path)
    tower = model.model.vision_tower
    torch.manual_seed(0)
    heads = vision.SceneHeads(tower.config.hidden_size)
    with torch.no_grad():  # a tower whose features are large and mostly one vector, as after vision pretraining
        tower.encoder.layers[-1].mlp.fc2.bias.add_(30.0)
    pixels = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        before = heads(tower, pixels)
        vision.standardize_vision_output(tower, heads, pixels)
        after = heads(tower, pixels)
        features = tower(pixel_values=pixels).last_hidden_state[:, 1:]
    assert features.mean(dim=(0, 1)).abs().max() < 1e-3
    assert abs(features.pow(2).mean().sqrt().item() - 1.0) < 1e-3
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_lora_trains_adapters_and_projector_not_the_base_weights(tmp_path):
    """vlm.model.lora on the VLM path: a real SFT step moves the LoRA adapters (language model
    only) and the projector; the base weights of the language model and the tower stay put."""
    from trl import SFTTrainer

    cfg, model, processor = _tiny(tmp_path, "vlm.model.lora.enabled=true", "vlm.model.lora.r=4",
                                  "vlm.sft.max_steps=2", "vlm.sft.learning_rate=1e-2")
    vlm_data.main(cfg)
    vlm.freeze_vision_tower(model, cfg.vlm.model)
    peft_model = vlm.add_lora(model, cfg.vlm.model)
    names = [n for n, _ in peft_model.named_parameters()]
    lora = [n for n in names if "lora_" in n]
    assert lora and all("language_model" in n for n in lora)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == set(lora) | {n for n in names if "modules_to_save" in n}
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    rows = artifacts.read_jsonl(paths.vlm_data_dir(cfg) / "sft.jsonl")
    args = training.trainer_args("sft", cfg.vlm.sft, tmp_path / "trainer", cfg.seed, cfg.vlm.model.bf16_training,
                                 max_length=None, completion_only_loss=True, remove_unused_columns=False,
                                 dataloader_pin_memory=False)
    trainer = SFTTrainer(model=peft_model, args=args,
                         train_dataset=vision.sft_dataset(rows, paths.vlm_data_dir(cfg), processor.tokenizer.eos_token),
                         processing_class=processor)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    moved = {n for n in names if not torch.equal(before[n], after[n].detach())}
    assert {n for n in lora if "lora_B" in n} <= moved  # B starts at zero: any step moves it
    assert any("modules_to_save" in n for n in moved)
    assert moved <= trainable  # base weights (language model, tower, embeddings) untouched
    merged = tmp_path / "merged"
    vlm.save(trainer.model, processor, merged)
    reloaded, _ = vlm.load(merged, cfg.vlm.model)
    assert not any("lora" in n for n, _ in reloaded.named_parameters())


def test_lora_vdpo_runs_with_the_guided_hook(tmp_path):
    """V-DPO on a PEFT-wrapped policy: the forward hook still guides it (γ ≠ 1), the output merges."""
    cfg, _, _ = _tiny(tmp_path, "vlm.model.lora.enabled=true", "vlm.model.lora.r=4", "vlm.sft.vision_pretrain_steps=2",
                      "vlm.sft.max_steps=1", "vlm.vdpo.max_steps=1", "vlm.vdpo.gamma_grid=[]", "vlm.pairs.alpha=none")
    vlm_data.main(cfg)
    vlm_sft.main(cfg)
    vdpo_pairs.main(cfg)
    cfg.job.variant = "vdpo"
    vdpo.main(cfg)
    stats = json.loads((paths.vdpo_dir(cfg, "vdpo") / "stats.json").read_text())
    assert stats["gamma"] == 0.75 and stats["steps"] == 1
    sft = load_file(paths.vlm_model_dir(cfg, "sft") / "model.safetensors")
    trained = load_file(paths.vlm_model_dir(cfg, "vdpo") / "model.safetensors")
    assert set(sft) == set(trained)
    assert torch.equal(sft["vision_tower.encoder.layers.0.self_attn.q_proj.weight"],
                       trained["vision_tower.encoder.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("override,key", [
    ("vlm.pope.models=[sft,base]", "vlm.pope.models"),
    ("vlm.pairs.alpha=clip", "vlm.pairs.alpha"),
    ("vlm.vdpo.gamma=-1", "vlm.vdpo.gamma"),
    ("vlm.data.n_pope_images=0", "vlm.data.n_pope_images"),
    ("vlm.model.kind=gpt", "vlm.model.kind"),
    ("vlm.sft.grounding_threshold=2", "vlm.sft.grounding_threshold"),
    ("vlm.sft.grounding_probes=-1", "vlm.sft.grounding_probes"),
    ("vlm.sft.restart_below=1.5", "vlm.sft.restart_below"),
    ("vlm.sft.restarts=-1", "vlm.sft.restarts"),
    ("vlm.sft.cpu_threads=-2", "vlm.sft.cpu_threads"),
])
def test_bad_vlm_config_names_the_key(override, key):
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.load([], [override])
