"""Schemas of the VL-CoT family (SPEC §6): interleaved vision-language chains with a vision
head, rejection-sampling tuning and grounding evaluation; with their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from closedloop.config.common import DType, LoraConfig, TrainArgs, check_range, check_train_args
from closedloop.config.core import ConfigError
from closedloop.config.vlm import VLMKind

QTYPES = ("relation", "counting", "attribute", "existence")
SFT_VARIANTS = ("direct", "text", "vision")
"""``direct``: answer only; ``text``: text-only chains (no vision head); ``vision``: interleaved chains."""


class Entropy(str, Enum):
    sharpen = "sharpen"  # R_ent = +Σ_t H(P̂_t): minimising the loss lowers the entropy
    smooth = "smooth"  # R_ent = −Σ_t H(P̂_t)


@dataclass
class VLCoTModelConfig:
    """The LLaVA (``LlavaForConditionalGeneration``) the family trains, tiny by default."""

    kind: VLMKind = VLMKind.tiny
    name_or_path: str = "tiny-llava-vlcot"
    """Hub id or local dir for ``kind: hf``; a label for ``tiny``."""
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: DType = DType.float32
    bf16_training: bool | None = False
    image_size: int = 64
    patch_size: int = 8
    """8: an 8×8 grid of 64 patches (``kind: hf`` reads both from the model: LLaVA-1.5 has 24×24 = 576)."""
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden_size: int = 128
    text_intermediate_size: int = 256
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    init_seed: int = 0
    freeze_vision_tower: bool = False
    """The tiny tower starts from random weights and learns from the grounding loss; freeze it for LLaVA-1.5."""
    lora: LoraConfig = field(default_factory=LoraConfig)


def _default_mix() -> dict[str, float]:
    return dict.fromkeys(QTYPES, 1.0)


@dataclass
class VLCoTDataConfig:
    """Seeded multi-object scenes and their questions (:mod:`closedloop.vlcot.scenes`)."""

    n_train_scenes: int = 300
    n_validation_scenes: int = 100
    n_heldout_scenes: int = 200
    questions_per_scene: int = 2
    min_objects: int = 2
    max_objects: int = 4
    min_size: int = 16
    max_size: int = 26
    overlap_prob: float = 0.25
    """Chance that an object may be placed over the earlier ones (else it is placed clear of their boxes)."""
    min_visible: float = 0.5
    """Every object keeps at least this fraction of its pixels visible."""
    patch_threshold: float = 0.25
    """A patch is labelled with an object when the object covers at least this fraction of it."""
    mix: dict[str, float] = field(default_factory=_default_mix)
    """Weight of each question type (relation, counting, attribute, existence)."""


@dataclass
class VisionHeadConfig:
    """The vision head's loss and selection (SPEC §6)."""

    dice_lambda: float = 1.0
    """λ of L_VL = L_BCE + λ·L_Dice."""
    entropy_alpha: float = 0.0
    """α of α·R_ent (0: no regulariser)."""
    entropy: Entropy = Entropy.sharpen
    select_threshold: float = 0.5
    """At a ⟨look⟩ the patches with Ŝ above this are appended (greedy generation)."""


@dataclass
class VLCoTSFTConfig(TrainArgs):
    """SFT on gold chains (teacher-forced with gold patches), one run per variant."""

    epochs: float = 4.0
    learning_rate: float = 1e-3
    batch_size: int = 16
    logging_steps: int = 10
    variants: list[str] = field(default_factory=lambda: list(SFT_VARIANTS))


@dataclass
class RejectionConfig(TrainArgs):
    """Rejection-sampling tuning (SPEC §6): sample, score, keep the best chain, fine-tune."""

    rounds: int = 1
    n_samples: int = 4
    """N chains sampled per training question."""
    n_questions: int = 0
    """Training questions sampled per round (0: all)."""
    temperature: float = 1.0
    sample_patches: bool = True
    """Sample each patch's selection ~ Bernoulli(Ŝ) (else the greedy threshold)."""
    threshold: float = 1.5
    """Keep a question's best chain when its function score (correct + mean IoU, in [0, 2]) reaches this."""
    max_new_tokens: int = 48
    looks: str = "sampled"
    """What the kept chains are teacher-forced with at their ⟨look⟩s: ``sampled`` (the patches the model
    selected: pure rejection sampling) or ``gold`` (the gold patch sets, when the chain has as many ⟨look⟩s)."""
    judge: bool = True
    """Also score every chain by the model's own P("yes") to "Is this reasoning correct?"."""
    epochs: float = 2.0
    learning_rate: float = 3e-4
    batch_size: int = 16
    logging_steps: int = 10
    batch_size_sampling: int = 64


@dataclass
class VLCoTEvalConfig:
    """Held-out answer accuracy by question type and grounding IoU / patch F1 (SPEC §6–7)."""

    models: list[str] = field(default_factory=lambda: ["base", "direct", "text", "vision"])
    """Besides every rejection round (``round<k>``)."""
    split: str = "heldout"
    """``validation`` to choose settings; never tune on ``heldout``."""
    batch_size: int = 64
    max_new_tokens: int = 48
    n_bootstrap: int = 1000
    ci_level: float = 0.95


@dataclass
class VLCoTConfig:
    """The VL-CoT family (SPEC §6): its own target ``vlcot_all``; outputs under ``results/<experiment>/vlcot/``."""

    model: VLCoTModelConfig = field(default_factory=VLCoTModelConfig)
    data: VLCoTDataConfig = field(default_factory=VLCoTDataConfig)
    head: VisionHeadConfig = field(default_factory=VisionHeadConfig)
    sft: VLCoTSFTConfig = field(default_factory=VLCoTSFTConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    eval: VLCoTEvalConfig = field(default_factory=VLCoTEvalConfig)


@dataclass
class VLCoTSections:
    """The VL-CoT family's section of :class:`~closedloop.config.ExperimentConfig`."""

    vlcot: VLCoTConfig = field(default_factory=VLCoTConfig)


def check_vlcot(v) -> None:
    """Cross-field checks of the ``vlcot`` section (SPEC §6)."""
    d = v.data
    if not 1 <= d.min_objects <= d.max_objects:
        raise ConfigError(f"keys 'vlcot.data.min_objects', 'vlcot.data.max_objects': expected 1 <= min <= max, "
                          f"got {d.min_objects}, {d.max_objects}")
    if not 4 <= d.min_size <= d.max_size <= v.model.image_size:
        raise ConfigError(f"keys 'vlcot.data.min_size', 'vlcot.data.max_size': expected 4 <= min <= max <= "
                          f"vlcot.model.image_size ({v.model.image_size}), got {d.min_size}, {d.max_size}")
    if set(d.mix) != set(QTYPES) or any(w < 0 for w in d.mix.values()) or sum(d.mix.values()) <= 0:
        raise ConfigError(f"key 'vlcot.data.mix': expected weights >= 0 for exactly {list(QTYPES)}, got {dict(d.mix)}")
    if v.model.image_size % v.model.patch_size:
        raise ConfigError(f"key 'vlcot.model.patch_size': expected a divisor of image_size {v.model.image_size}, "
                          f"got {v.model.patch_size}")
    for name in v.sft.variants:
        if name not in SFT_VARIANTS:
            raise ConfigError(f"key 'vlcot.sft.variants': unknown variant {name!r} (expected any of {list(SFT_VARIANTS)})")
    if v.rejection.rounds > 0 and "vision" not in v.sft.variants:
        raise ConfigError("key 'vlcot.sft.variants': rejection rounds start from the 'vision' SFT model; "
                          "add 'vision' or set vlcot.rejection.rounds: 0")
    for tag in v.eval.models:
        if tag != "base" and tag not in v.sft.variants:
            raise ConfigError(f"key 'vlcot.eval.models': unknown model {tag!r} (expected 'base' or one of "
                              f"vlcot.sft.variants {list(v.sft.variants)})")
    if v.eval.split not in ("heldout", "validation"):
        raise ConfigError(f"key 'vlcot.eval.split': expected 'heldout' or 'validation', got {v.eval.split!r}")
    if v.rejection.looks not in ("sampled", "gold"):
        raise ConfigError(f"key 'vlcot.rejection.looks': expected 'sampled' or 'gold', got {v.rejection.looks!r}")
    _check_ranges(v)


def _check_ranges(v) -> None:
    """Every numeric value's range (the shared :func:`check_range` / :func:`check_train_args`)."""
    d, h, r, e = v.data, v.head, v.rejection, v.eval
    for key in ("n_train_scenes", "n_validation_scenes", "n_heldout_scenes", "questions_per_scene"):
        check_range(f"vlcot.data.{key}", d[key], 1)
    for key in ("overlap_prob", "min_visible", "patch_threshold"):
        check_range(f"vlcot.data.{key}", d[key], 0, 1)
    check_range("vlcot.head.dice_lambda", h.dice_lambda, 0)
    check_range("vlcot.head.entropy_alpha", h.entropy_alpha, 0)
    check_range("vlcot.head.select_threshold", h.select_threshold, 0, 1)
    check_train_args("vlcot.sft", v.sft)
    check_train_args("vlcot.rejection", r)
    check_range("vlcot.rejection.rounds", r.rounds, 0)
    check_range("vlcot.rejection.n_questions", r.n_questions, 0)
    for key in ("n_samples", "max_new_tokens", "batch_size_sampling"):
        check_range(f"vlcot.rejection.{key}", r[key], 1)
    check_range("vlcot.rejection.temperature", r.temperature, 0, low_open=True)
    for key in ("batch_size", "max_new_tokens", "n_bootstrap"):
        check_range(f"vlcot.eval.{key}", e[key], 1)
    check_range("vlcot.eval.ci_level", e.ci_level, 0, 1, low_open=True, high_open=True)
