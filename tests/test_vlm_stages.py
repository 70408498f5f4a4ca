"""The V-DPO branch's stages (SPEC §4) for real on the vlm_smoke config, in process, and the
`vdpo_all` target's DAG (Snakemake dry run)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from closedloop import artifacts, config, pope, vdpo, vdpo_pairs, vlm, vlm_data, vlm_sft

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_the_branch_runs_end_to_end(tmp_path):
    cfg = config.load([ROOT / "configs" / "vlm_smoke.yaml"],
                      [f"data_dir={tmp_path / 'data'}", f"results_dir={tmp_path / 'results'}"])
    vlm_data.main(cfg)
    vlm_sft.main(cfg)
    sft = vlm.sft_dir(cfg)
    assert {p.name for p in sft.iterdir()} == {"config.yaml", "provenance.json", "model", "train_log.csv",
                                               "vision_log.csv", "heads.safetensors", "stats.json"}
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (sft / "model").iterdir())
    vision_log = (sft / "vision_log.csv").read_text().splitlines()
    assert vision_log[0] == "step,loss,shape_acc,color_acc" and len(vision_log) == 1 + 5
    base = load_file(Path(vlm.base_source(cfg.vlm.model)) / "model.safetensors")
    trained = load_file(sft / "model" / "model.safetensors")
    assert not torch.equal(base["vision_tower.embeddings.patch_embedding.weight"],
                           trained["vision_tower.embeddings.patch_embedding.weight"])

    vdpo_pairs.main(cfg)
    rows = artifacts.read_jsonl(vlm.pairs_dir(cfg) / "pairs.jsonl")
    assert len(rows) == 8 and all(0.0 <= r["alpha"] <= 0.5 for r in rows)
    image_rows = [r for r in rows if r["kind"] == "image"]
    assert len(image_rows) == 4 and {r["edit"]["kind"] for r in image_rows} == {"remove", "recolour"}
    assert all((vlm.pairs_dir(cfg) / r["rejected_image"]).is_file() and r["edit"]["pixels_changed"] > 0
               for r in image_rows)
    assert all(r["chosen"] == r["rejected"] for r in image_rows)
    assert all(r["chosen"] != r["rejected"] for r in rows if r["kind"] != "image")

    for variant in ("vdpo", "dpo"):
        cfg.job.variant = variant
        vdpo.main(cfg)
        stats = json.loads((vlm.train_dir(cfg, variant) / "stats.json").read_text())
        assert stats["gamma"] == (0.75 if variant == "vdpo" else 1.0) and stats["steps"] == 2 and stats["alpha"]
        prov = json.loads((vlm.train_dir(cfg, variant) / "provenance.json").read_text())
        assert prov["inputs"]["pairs"]["sha256"] == artifacts.content_hash(vlm.pairs_dir(cfg))

    for tag in ("sft", "dpo", "vdpo"):
        cfg.job.model = tag
        pope.main(cfg)
        out = vlm.pope_dir(cfg, tag)
        metrics = json.loads((out / "metrics.json").read_text())
        preds = artifacts.read_jsonl(out / "predictions.jsonl")
        assert metrics["all"]["n"] == len(preds) == 6 * 2 * 3
        assert set(metrics["splits"]) == {"random", "popular", "adversarial"}
        labels = [p["label"] for p in preds]
        answers = [pope.parse_answer(p["generation"]) for p in preds]
        assert metrics["all"]["confusion"] == pope.confusion(labels, answers)
        assert metrics["all"]["ci"]["f1"][0] <= metrics["all"]["f1"] <= metrics["all"]["ci"]["f1"][1]
    pope.report(cfg)
    report = vlm.report_file(cfg).read_text()
    assert all(f"| {t} | " in report for t in ("sft", "dpo", "vdpo")) and "| adversarial |" in report
    assert (vlm.run_dir(cfg) / "report.provenance.json").is_file()


def test_stage_views_are_narrow():
    cfg = config.load([ROOT / "configs" / "vlm_smoke.yaml"])
    assert set(vlm.stage_view(cfg, "vlm_data")["vlm"]) == {"data"}
    assert set(vlm.stage_view(cfg, "pope", model="sft")["vlm"]) == {"model", "data", "sft", "pope"}
    assert "vdpo" in vlm.stage_view(cfg, "pope", model="vdpo")["vlm"]
    cfg.vlm.pairs.alpha = "none"
    assert set(vlm.stage_view(cfg, "vdpo_pairs")["vlm"]) == {"data", "pairs"}


def test_vdpo_all_dag(repo_copy):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--configfile",
                          "configs/vlm_smoke.yaml", "--", "vdpo_all"], cwd=repo_copy, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    table = re.search(r"job\s+count\n[-\s]+\n(.*?)\ntotal", out.stdout, re.S)
    jobs = {m[0]: int(m[1]) for m in re.findall(r"(\w+)\s+(\d+)", table.group(1))}
    assert jobs == {"vlm_data": 1, "vlm_sft": 1, "vdpo_pairs": 1, "vdpo_train": 2, "pope_eval": 3,
                    "vlm_report": 1, "vdpo_all": 1}
    assert "results/vlm_smoke/vlm/vdpo" in out.stdout and "results/vlm_smoke/vlm/dpo" in out.stdout


def test_paper_preset_keeps_the_hub_model():
    cfg = config.load([ROOT / "configs" / "paper" / "vdpo_llava7b.yaml"])
    assert cfg.vlm.model.kind == config.VLMKind.hf and cfg.vlm.model.name_or_path == "llava-hf/llava-1.5-7b-hf"
    assert (cfg.vlm.vdpo.gamma, cfg.vlm.vdpo.beta, cfg.vlm.vdpo.learning_rate) == (0.75, 0.1, 1e-6)
    assert cfg.vlm.vdpo.batch_size * cfg.vlm.vdpo.grad_accum == 64 and cfg.vlm.vdpo.epochs == 4
    assert not cfg.vlm.model.trust_remote_code


@pytest.mark.parametrize("override,key", [
    ("vlm.pope.models=[sft,base]", "vlm.pope.models"),
    ("vlm.pairs.alpha=clip", "vlm.pairs.alpha"),
    ("vlm.vdpo.gamma=-1", "vlm.vdpo.gamma"),
    ("vlm.data.n_pope_images=0", "vlm.data.n_pope_images"),
    ("vlm.model.kind=gpt", "vlm.model.kind"),
])
def test_bad_vlm_config_names_the_key(override, key):
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.load([], [override])
