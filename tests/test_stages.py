"""SFT and evaluate run for real on the tiny random-init Llama; assert the exact files."""

import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from closedloop import artifacts, config, models, paths, prompts, reporting
from closedloop.stages import data, evaluate, evaluate_decoding, sft

pytestmark = pytest.mark.slow

MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def build_data(cfg, *names):
    for name in names:
        cfg.job.task = name
        data.main(cfg)


def test_sft_writes_a_loadable_model_and_log(smoke_cfg):
    build_data(smoke_cfg, "synthetic")
    sft.main(smoke_cfg)
    out = paths.sft_dir(smoke_cfg)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model", "provenance.json", "train_log.csv"]
    files = {p.name for p in (out / "model").iterdir()}
    assert MODEL_FILES <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".pth")) for f in files)  # safetensors only
    with open(out / "train_log.csv") as fh:
        log = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in log] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r["loss"])) and float(r["lr"]) >= 0 for r in log)
    trained = load_file(out / "model" / "model.safetensors")
    base = load_file(models.tiny_dir(smoke_cfg.model) / "model.safetensors")
    assert any(not torch.equal(trained[k], base[k]) for k in base)  # training moved the weights
    prov = json.loads((out / "provenance.json").read_text())
    data_dir = paths.data_dir(smoke_cfg, "synthetic")
    assert prov["inputs"]["data"]["sha256"] == artifacts.content_hash(data_dir)
    model, _ = models.load_dir(out / "model", smoke_cfg.model)
    assert model.config.num_hidden_layers == 2


def test_sft_with_lora_merges_into_a_plain_dir(smoke_cfg):
    build_data(smoke_cfg, "synthetic")
    smoke_cfg.model.lora.enabled = True
    smoke_cfg.sft.max_steps = 2
    sft.main(smoke_cfg)
    model_dir = paths.sft_dir(smoke_cfg) / "model"
    assert not (model_dir / "adapter_config.json").exists()
    assert not any("lora" in k for k in load_file(model_dir / "model.safetensors"))


@pytest.mark.parametrize("task,scoring", [("synthetic", "generate"), ("arc_challenge", "generate"),
                                          ("arc_challenge", "loglikelihood")])
def test_evaluate_writes_predictions_and_metrics(smoke_cfg, task, scoring):
    build_data(smoke_cfg, task)
    smoke_cfg.job.model, smoke_cfg.job.task = "base", task
    smoke_cfg.eval.mc_scoring = config.MCScoring(scoring if task == "arc_challenge" else "loglikelihood")
    evaluate.main(smoke_cfg)
    out = paths.eval_dir(smoke_cfg, "base", task)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.json", "predictions.jsonl",
                                                     "provenance.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    preds = artifacts.read_jsonl(out / "predictions.jsonl")
    assert metrics["n"] == len(preds) == 12 and metrics["scoring"] == scoring
    assert metrics["accuracy"] == pytest.approx(sum(p["correct"][0] for p in preds) / 12)
    assert metrics["ci_low"] <= metrics["accuracy"] <= metrics["ci_high"]
    assert metrics["k"] == 1 and metrics["seed"] == 0
    assert metrics["model"]["kind"] == "tiny" and len(metrics["model"]["sha256"]) == 64
    assert metrics["data"]["sha256"] == artifacts.content_hash(paths.data_dir(smoke_cfg, task) / "heldout.jsonl")
    if scoring == "loglikelihood":  # lm-evaluation-harness: one log-likelihood per choice, acc and acc_norm
        assert metrics["decoding"] == "loglikelihood" and metrics["generated_tokens"] == 0
        assert metrics["acc_norm"]["accuracy"] == pytest.approx(sum(p["correct_norm"] for p in preds) / 12)
        assert all(set(p) == {"id", "answer", "loglik", "extracted", "correct", "correct_norm"} for p in preds)
        assert all(len(p["loglik"]) >= 2 for p in preds)
        return
    assert metrics["decoding"] == "greedy"
    assert 0 < metrics["generated_tokens"] <= 12 * (24 if task == "synthetic" else 6)
    assert all(set(p) == {"id", "answer", "completions", "extracted", "correct"} for p in preds)
    assert metrics["invalid_rate"] == pytest.approx(sum(p["extracted"][0] is None for p in preds) / 12)


def test_evaluate_on_validation_in_bf16_names_split_and_dtype(smoke_cfg):
    build_data(smoke_cfg, "synthetic")
    smoke_cfg.job.model, smoke_cfg.job.task = "base", "synthetic"
    smoke_cfg.eval.split, smoke_cfg.model.inference_dtype = config.Split.validation, config.DType.bfloat16
    evaluate.main(smoke_cfg)
    out = paths.eval_dir(smoke_cfg, "base", "synthetic")
    metrics = json.loads((out / "metrics.json").read_text())
    data_dir = paths.data_dir(smoke_cfg, "synthetic")
    val_ids = [r["id"] for r in artifacts.read_jsonl(data_dir / "validation.jsonl")]
    assert [p["id"] for p in artifacts.read_jsonl(out / "predictions.jsonl")] == val_ids
    assert metrics["split"] == "validation" and metrics["dtype"] == "bfloat16" and metrics["device"] == "cpu"
    assert metrics["data"]["sha256"] == artifacts.content_hash(data_dir / "validation.jsonl")
    model, _ = models.load_dir(models.base_source(smoke_cfg.model), smoke_cfg.model)
    assert next(model.parameters()).dtype == torch.float32  # training stages keep model.dtype


def test_evaluate_on_an_empty_validation_split_names_the_key(smoke_cfg):
    build_data(smoke_cfg, "arc_challenge")
    smoke_cfg.job.model, smoke_cfg.job.task = "base", "arc_challenge"
    smoke_cfg.eval.split = config.Split.validation
    with pytest.raises(config.ConfigError, match="eval.split.*validation.jsonl has no rows.*n_validation"):
        evaluate.main(smoke_cfg)


def test_sampled_decoding_scores_k_samples(smoke_cfg):
    build_data(smoke_cfg, "synthetic")
    smoke_cfg.eval.decoding = config.Decoding.sampled
    smoke_cfg.eval.k = 3
    smoke_cfg.job.model, smoke_cfg.job.task = "base", "synthetic"
    evaluate.main(smoke_cfg)
    out = paths.eval_dir(smoke_cfg, "base", "synthetic")
    preds = artifacts.read_jsonl(out / "predictions.jsonl")
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(len(p["completions"]) == 3 == len(p["correct"]) for p in preds)
    assert metrics["k"] == 3 and set(metrics["pass_at_k"]) >= {"accuracy", "ci_low", "ci_high", "n"}
    assert metrics["pass_at_k"]["accuracy"] >= metrics["accuracy"]


def test_failed_stage_leaves_no_artifact(smoke_cfg):
    build_data(smoke_cfg, "synthetic")
    smoke_cfg.job.model, smoke_cfg.job.task = "sft", "synthetic"  # no SFT model yet
    with pytest.raises(OSError):
        evaluate.main(smoke_cfg)
    eval_root = paths.run_dir(smoke_cfg) / "eval"
    assert not eval_root.exists() or not any(eval_root.rglob("*.json"))


def test_prompts_use_the_chat_template(smoke_cfg):
    _, tokenizer = models.load_base(smoke_cfg.model)
    row = {"id": "x", "question": "Q?", "answer": "B", "solution_steps": None, "choices": ["p", "q"]}
    text = prompts.chat_prompt(tokenizer, row)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    assert "(A) p\n(B) q" in text
    assert prompts.sft_example(row)["completion"][0]["content"] == "The answer is (B)."


@pytest.mark.parametrize("decoding", ["self_consistency", "beam_self_eval"])
def test_search_decodings_score_one_answer_per_question(smoke_cfg, decoding):
    build_data(smoke_cfg, "synthetic")
    smoke_cfg.eval.decoding = config.Decoding(decoding)
    smoke_cfg.eval.k, smoke_cfg.eval.beam_k, smoke_cfg.eval.beam_n, smoke_cfg.eval.beam_max_steps = 3, 2, 2, 2
    smoke_cfg.eval.beam_step_tokens = 8
    smoke_cfg.job.model, smoke_cfg.job.task = "base", "synthetic"
    evaluate.main(smoke_cfg)
    out = paths.eval_dir(smoke_cfg, "base", "synthetic")
    preds = artifacts.read_jsonl(out / "predictions.jsonl")
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(preds) == 12 and all(len(p["completions"]) == 1 for p in preds)
    assert metrics["decoding"] == decoding and metrics["generated_tokens"] > 0
    assert ("beam" in metrics) == (decoding == "beam_self_eval")


def test_decoding_comparison_runs_each_method_on_the_same_questions(smoke_cfg):
    """evaluate_decoding: one dir per (model, task, decoding), the first n questions,
    generated tokens counted; the report lists each with its budget."""
    build_data(smoke_cfg, "synthetic")
    smoke_cfg.decodings.methods = [config.Decoding(d) for d in ("greedy", "self_consistency", "beam_self_eval")]
    smoke_cfg.decodings.models, smoke_cfg.decodings.n_questions = ["base"], 5
    smoke_cfg.decodings.samples, smoke_cfg.decodings.beam_k, smoke_cfg.decodings.beam_n = 4, 2, 2
    smoke_cfg.eval.beam_max_steps, smoke_cfg.eval.beam_step_tokens = 2, 8
    smoke_cfg.job.model, smoke_cfg.job.task = "base", "synthetic"
    for decoding in ("greedy", "self_consistency", "beam_self_eval"):
        smoke_cfg.job.decoding = decoding
        evaluate_decoding.main(smoke_cfg)
    found = reporting.decoding_metrics(smoke_cfg)
    assert sorted(d for _, _, d in found) == ["beam_self_eval", "greedy", "self_consistency"]
    for (_, _, decoding), m in found.items():
        assert m["n"] == 5 and m["decoding"] == decoding and m["generated_tokens"] > 0
        assert m["generated_tokens_per_question"] == pytest.approx(m["generated_tokens"] / 5)
    assert found[("base", "synthetic", "self_consistency")]["k"] == 4
    section = reporting.decoding_section(smoke_cfg, found)
    assert "| base | synthetic | beam_self_eval |" in section and "beams 2 × candidates 2" in section
    smoke_cfg.job.decoding = "sampled"
    with pytest.raises(config.ConfigError, match="job.decoding"):
        evaluate_decoding.main(smoke_cfg)
