"""Schemas of the COrAL family (SPEC §5): order-agnostic post-training in two stages and
sliding blockwise decoding, with their cross-field checks.

Reference settings (github YuxiXie/COrAL, ``scripts/coral-stage{1,2}-arithmetic.sh``):
``--context_window 4 --n_back_pred 2`` (W_f = 4, W_b = 8), corrupt chunks ≤ 4, stage 1 = last
layer + lm_head at lr 5e-6 for 3 epochs; stage 2 = the whole model at lr 1e-6 (the issue says
5e-6; ``configs/paper/coral_mistral7b.yaml`` has the script's value). Decoding: block 16,
ε = 0.1, occurrence threshold 3 (``main.py``; ``inference.py`` uses 8), at most 512 iterations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import DictConfig

from closedloop.config.common import TrainArgs, check_range, check_train_args
from closedloop.config.core import ConfigError


class CoralInit(str, Enum):
    last = "last"  # the closed loop's final policy (SFT when loop.iterations is 0)
    sft = "sft"


class CoralDecoding(str, Enum):
    greedy = "greedy"  # AR greedy of the model's own +1 prediction
    coral_blockwise = "coral_blockwise"


@dataclass
class CoralStageConfig(TrainArgs):
    """One COrAL training stage (``transformers.Trainer`` subclass, :mod:`closedloop.coral.trainer`)."""

    learning_rate: float = 5e-6
    epochs: float = 1.0
    """Reference: 3 (``configs/paper/coral_mistral7b.yaml``)."""
    max_steps: int = 8
    """The CPU default trains 8 steps of 4 solutions per stage, so that the main job fits its
    time on 2 cores (a step of SmolLM2 with 12 targets per position costs seconds there); the
    paper preset sets -1 (epochs)."""
    batch_size: int = 4
    logging_steps: int = 2


@dataclass
class CoralDecodingConfig:
    """Sliding blockwise decoding (SPEC §5, :mod:`closedloop.coral.decoding`)."""

    block: int = 4
    """The paper's 16 on a GPU; 4 on a CPU, where a pass costs in proportion to the rows it
    re-feeds (``bench/coral_decoding.py``: block 16 ran at 0.15× AR wall, block 4 at 0.53×)."""
    eps: float = 0.1
    """Acceptance p ≥ min(ε, √ε·e^{−H}); 0 accepts every token."""
    threshold: int = 3
    """A position is fixed after it stayed unchanged more than this many refinements."""
    max_refinements: int = 512
    """Cap on iterations (forward passes) per question."""


@dataclass
class CoralConfig:
    """COrAL post-training of the loop's policy and its evaluation (SPEC §5)."""

    init: CoralInit = CoralInit.last
    task: str = "synthetic"
    """Training solutions come from this task's training split (the SFT task's by default)."""
    window: int = 4
    """W_f: forward targets i+1..i+W_f."""
    n_back_pred: float = 2.0
    """W_b = int(window · n_back_pred) = 8: backward targets i−W_b..i (the reference's multiplier)."""
    max_chunk: int = 4
    """Largest corrupted chunk."""
    max_length: int = 384
    stage1: CoralStageConfig = field(default_factory=CoralStageConfig)
    """Last layer + lm_head (a tied lm_head is untied first: :func:`closedloop.coral.model.untie_lm_head`)."""
    stage2: CoralStageConfig = field(default_factory=CoralStageConfig)
    """The whole model."""
    decoding: CoralDecodingConfig = field(default_factory=CoralDecodingConfig)
    eval_tasks: list[str] = field(default_factory=lambda: ["synthetic"])
    """Held-out splits the COrAL model is evaluated on (AR greedy and blockwise)."""
    eval_decodings: list[CoralDecoding] = field(
        default_factory=lambda: [CoralDecoding.greedy, CoralDecoding.coral_blockwise])
    n_questions: int = 20
    """The first n held-out questions of each task (0: all); decoding runs one question at a time
    (20 on the CPU default: wide intervals; the paper preset evaluates all)."""


@dataclass
class CoralSections:
    """The COrAL family's section of :class:`~closedloop.config.ExperimentConfig`."""

    coral: CoralConfig = field(default_factory=CoralConfig)


def check_coral(cfg: DictConfig) -> None:
    """Cross-field checks of the ``coral`` section."""
    c = cfg.coral
    shared = [("eval.decoding", [cfg.eval.decoding]), ("decodings.methods", list(cfg.decodings.methods))]
    for key, values in shared:
        if "coral_blockwise" in [getattr(v, "value", v) for v in values]:
            raise ConfigError(f"key '{key}': coral_blockwise decodes a COrAL model only; it runs in the "
                              "coral_evaluate jobs of `snakemake coral_all` (set coral.eval_decodings)")
    for key, names in (("coral.task", [c.task]), ("coral.eval_tasks", list(c.eval_tasks))):
        for name in names:
            if name not in cfg.data.tasks:
                raise ConfigError(f"key '{key}': task {name!r} is not in data.tasks "
                                  f"(expected one of {sorted(cfg.data.tasks)})")
    check_range("coral.window", c.window, 1)
    check_range("coral.n_back_pred", c.n_back_pred, 0)
    check_range("coral.max_chunk", c.max_chunk, 1)
    check_range("coral.max_length", c.max_length, 2)
    check_train_args("coral.stage1", c.stage1)
    check_train_args("coral.stage2", c.stage2)
    d = c.decoding
    check_range("coral.decoding.block", d.block, 1)
    check_range("coral.decoding.eps", d.eps, 0, 1)
    check_range("coral.decoding.threshold", d.threshold, 0)
    check_range("coral.decoding.max_refinements", d.max_refinements, 1)
    check_range("coral.n_questions", c.n_questions, 0, why="0: all")
