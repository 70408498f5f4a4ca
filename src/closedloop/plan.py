"""``closedloop plan-resources``: per-stage GPU-memory estimates of an experiment config under
its launch settings, so a lab sees before submitting whether a preset fits the GPUs it asks for.

Training stages (sft, dpo, vlm_sft, vdpo), bytes per GPU::

    weights    P x b                  P parameters, b bytes of model.dtype
    grads      T x b                  T trainable (all, or the LoRA adapter [+ VLM projector])
    optimizer  2 T x b                AdamW's two moments, in the parameters' dtype
    reference  P x b                  dpo/vdpo: the reference model the stage loads beside the policy
    (the "FSDP" column: the four above / world size, as FSDP full_shard splits them; a stage runs
    FSDP when its section's ``trainer_args`` sets transformers' ``fsdp`` (full shard: not with
    ``fsdp_config.reshard_after_forward: false``; it hands the model to accelerate's FSDP plugin), else DDP, where every rank holds
    all four; ``fits`` judges the one the stage runs)
    activations  rows x seq x [L h a + (12 h + 3 kv + 4 i) a + 3 V x 4]

Activations assume gradient checkpointing, which TRL's SFTConfig and DPOConfig turn on by default
(:func:`closedloop.training.trainer_args` keeps it): each layer keeps its input (L h a) and one
layer at a time holds its full set while it is recomputed.
``rows`` is the per-device batch (x2 for DPO: chosen + rejected), ``seq`` the configured
``max_length``, ``a`` the activation bytes (2 under bf16 autocast, else b). The layer term
counts the tensors a Llama decoder layer keeps for backward per token (two RMSNorm inputs and
outputs, q/k/v and their rotary copies, the grouped k/v repeated to every head, attention and
o_proj outputs: 12 h + 3 kv; gate, up, SiLU(gate), their product: 4 i); the last term is
:data:`LOGIT_COPIES` fp32 tensors of rows x seq x V alive at the start of backward.
Not counted: the HF/TRL trainers' own transient copies (TRL's entropy and token-accuracy
metrics), the CUDA context and allocator fragmentation (``fits`` keeps 10% for them).
Decoding stages (evaluate, mcts, instance, pope): weights in the inference dtype + the KV
cache (rows x seq x L x 2 kv x a) + one step's fp32 logits.

Model shapes come from the tiny model's config section, a local ``from_pretrained`` dir's
``config.json``, or :data:`KNOWN` (the paper presets' hub models, offline). No torch import.
Launch infrastructure: SPEC describes the methods only; the hyperparameters read here are
the presets' (SPEC §2–4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from closedloop import config as cl_config

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GB = 1024**3
TINY_VOCAB = 49152
"""The tiny model's vocabulary: SmolLM2's tokenizer (``models.load_base``)."""
LOGIT_COPIES = 3
"""rows x seq x vocab fp32 tensors alive at once at the start of backward: the log-softmax output
(kept by cross-entropy for backward), its gradient, the logits' gradient (the logits themselves
are freed after the forward)."""


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a decoder-only LM (+ a vision tower for LLaVA)."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool
    vision_params: int = 0
    """Vision tower + projector parameters (LLaVA); the projector is trained, the tower frozen."""
    projector_params: int = 0
    image_tokens: int = 0

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads


KNOWN = {
    "mistralai/Mistral-7B-v0.1": Shape(32000, 4096, 32, 14336, 32, 8, tied=False),
    # Llama-2-7B language model; CLIP ViT-L/14-336 tower (303.5M) + 2-layer MLP projector 1024->4096->4096;
    # 7,063,427,072 parameters in all, as the hub model's safetensors index says
    "llava-hf/llava-1.5-7b-hf": Shape(32064, 4096, 32, 11008, 32, 32, tied=False,
                                      vision_params=303_507_456 + 20_979_712, projector_params=20_979_712,
                                      image_tokens=576),
}
"""Shapes of the paper presets' hub models (from their config.json), so planning works offline."""


def shape(model_cfg, source: str = "model") -> Shape:
    """The shape of ``model_cfg``'s base model; errors name the key and what would work."""
    kind = str(getattr(model_cfg.kind, "value", model_cfg.kind))
    if kind == "tiny":
        t = model_cfg.tiny
        return Shape(TINY_VOCAB, t.hidden_size, t.num_hidden_layers, t.intermediate_size, t.num_attention_heads,
                     t.num_key_value_heads, tied=True)
    name = str(model_cfg.name_or_path)
    if name in KNOWN:
        return KNOWN[name]
    local = Path(name) / "config.json"
    if local.is_file():
        c = json.loads(local.read_text())
        c = c.get("text_config", c)
        return Shape(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"],
                     c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"]),
                     tied=bool(c.get("tie_word_embeddings", False)))
    raise cl_config.ConfigError(f"key '{source}.name_or_path': no shape known for {name!r} (expected a local "
                                f"from_pretrained dir with config.json, or one of {sorted(KNOWN)})")


def n_params(s: Shape) -> int:
    """Parameters of a Llama-style LM: embeddings (+ untied head), per layer q/o (h x h), k/v
    (h x kv), gate/up/down (h x i) and two norms, the final norm; + the vision tower and projector."""
    per_layer = 2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_dim + 3 * s.hidden * s.intermediate + 2 * s.hidden
    return s.vocab * s.hidden * (1 if s.tied else 2) + s.layers * per_layer + s.hidden + s.vision_params


def n_lora(s: Shape, lora) -> int:
    """LoRA adapter parameters: r x (in + out) for each targeted linear layer of every decoder layer."""
    dims = {"q_proj": (s.hidden, s.hidden), "o_proj": (s.hidden, s.hidden), "k_proj": (s.hidden, s.kv_dim),
            "v_proj": (s.hidden, s.kv_dim), "gate_proj": (s.hidden, s.intermediate),
            "up_proj": (s.hidden, s.intermediate), "down_proj": (s.intermediate, s.hidden)}
    return s.layers * sum(lora.r * sum(dims[m]) for m in lora.target_modules if m in dims)


def activations(s: Shape, rows: int, seq: int, act_bytes: int, recompute: bool = False) -> int:
    """Bytes kept for backward; ``recompute`` (gradient checkpointing): each layer's input only,
    plus one layer's full set while it is recomputed."""
    per_token_layer = (12 * s.hidden + 3 * s.kv_dim + 4 * s.intermediate) * act_bytes
    layers = s.layers * s.hidden * act_bytes + per_token_layer if recompute else s.layers * per_token_layer
    return rows * seq * (layers + LOGIT_COPIES * s.vocab * 4)


@dataclass
class Estimate:
    stage: str
    gpus: int
    """GPUs in the job (nodes x GPUs per node; 1 for a CPU-only job)."""
    sharding: str
    weights: int = 0
    grads: int = 0
    optimizer: int = 0
    reference: int = 0
    activations: int = 0
    gpu_mem_gb: float | None = None

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.reference + self.activations

    @property
    def sharded_total(self) -> int:
        """Per GPU if weights, grads, optimizer and reference were split over the job's GPUs (FSDP full_shard)."""
        return (self.weights + self.grads + self.optimizer + self.reference) // self.gpus + self.activations

    @property
    def fits(self) -> str:
        if not self.gpu_mem_gb:
            return "?"
        need = self.sharded_total if self.sharding == "fsdp" else self.total
        return "yes" if need <= self.gpu_mem_gb * GB * 0.9 else "NO"  # 10% for CUDA context + fragmentation


TRAINING_SECTIONS = {"sft": ("sft", 1), "dpo": ("dpo", 2), "vlm_sft": ("vlm.sft", 1), "vdpo": ("vlm.vdpo", 2)}
"""Training stage -> (config section, rows per example: DPO scores chosen and rejected)."""


def training(stage: str, cfg, res: dict) -> Estimate:
    """Memory per GPU of one training stage with launch resources ``res``."""
    section, per_example = TRAINING_SECTIONS[stage]
    vlm = stage in ("vlm_sft", "vdpo")
    model_cfg = cfg.vlm.model if vlm else cfg.model
    s = shape(model_cfg, "vlm.model" if vlm else "model")
    t = _select(cfg, section)
    b = BYTES[str(getattr(model_cfg.dtype, "value", model_cfg.dtype))]
    p = n_params(s)
    lora = model_cfg.lora.enabled
    trainable = n_lora(s, model_cfg.lora) + s.projector_params if lora else p - (s.vision_params - s.projector_params)
    world = max(res.get("gpus_per_node") or 0, 1) * (res.get("nodes") or 1)
    seq = int(t.get("max_length") or 512) + s.image_tokens
    act = 2 if model_cfg.get("bf16_training") or b == 2 else b
    needs_reference = per_example == 2  # dpo and vdpo load a reference model beside the policy (LoRA too)
    passed = t.get("trainer_args") or {}
    fsdp = passed.get("fsdp") not in (None, False, "") and (passed.get("fsdp_config") or {}).get(
        "reshard_after_forward", True) is not False  # transformers' fsdp: true / "full_shard ..."; not SHARD_GRAD_OP
    sharding = ("fsdp" if fsdp else "ddp") if world > 1 else "one device"
    return Estimate(stage, world, sharding, weights=p * b, grads=trainable * b,
                    optimizer=2 * trainable * b, reference=p * b if needs_reference else 0,
                    activations=activations(s, int(t.batch_size) * per_example, seq, act, recompute=True),
                    gpu_mem_gb=res.get("gpu_mem_gb"))


def _select(cfg, dotted: str):
    for key in dotted.split("."):
        cfg = cfg[key]
    return cfg


def decoding(stage: str, cfg, res: dict) -> Estimate:
    """Memory of one decoding stage (one GPU): weights, KV cache of the batch, one step's logits."""
    vlm = stage == "pope"
    model_cfg = cfg.vlm.model if vlm else cfg.model
    s = shape(model_cfg, "vlm.model" if vlm else "model")
    dtype = model_cfg.get("inference_dtype") or model_cfg.dtype
    b = BYTES[str(getattr(dtype, "value", dtype))]
    if stage == "mcts":
        rows = int(cfg.mcts.trees_per_batch) * int(cfg.mcts.max_children)
        seq = int(cfg.sft.max_length)
    elif vlm:
        rows, seq = int(cfg.vlm.pope.batch_size), 64 + s.image_tokens
    else:
        rows, seq = int(cfg.eval.batch_size), int(cfg.sft.max_length) + int(cfg.eval.max_new_tokens)
    kv = rows * seq * s.layers * 2 * s.kv_dim * b
    return Estimate(stage, max(res.get("gpus_per_node") or 0, 1), "one device", weights=n_params(s) * b,
                    activations=kv + rows * s.vocab * 4, gpu_mem_gb=res.get("gpu_mem_gb"))


def plan(cfg, launch, stages: list[str]) -> list[Estimate]:
    """Estimates for ``stages`` under the launch settings ``launch`` (:mod:`closedloop.launch`)."""
    from closedloop import launch as cl_launch

    out = []
    for stage in stages:
        res = cl_launch.resources(stage, launch.slurm)
        out.append(training(stage, cfg, res) if stage in TRAINING_SECTIONS else decoding(stage, cfg, res))
    return out


def table(estimates: list[Estimate]) -> str:
    """A markdown table, GiB per GPU."""
    head = ("| stage | GPUs | runs as | weights | grads | optimizer | reference | activations | total / GPU "
            "| FSDP full_shard / GPU | GPU memory | fits |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [f"| {e.stage} | {e.gpus} | {e.sharding} | " + " | ".join(f"{v / GB:.2f}" for v in (
        e.weights, e.grads, e.optimizer, e.reference, e.activations, e.total)) + " | "
        + (f"{e.sharded_total / GB:.2f}" if e.stage in TRAINING_SECTIONS else "-")
        + f" | {e.gpu_mem_gb or '?'} | {e.fits} |" for e in estimates]
    return "\n".join([head, *rows])
