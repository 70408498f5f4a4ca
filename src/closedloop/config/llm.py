"""Schemas of the LLM closed loop (SPEC §1–3, §7): tasks, SFT, evaluation, MCTS, DPO, the
loop and its ablations, the decoding comparison, the report; with their cross-field checks.

Longer than 400 lines because every field's range check sits beside its schema, so a new
field and its check are read (and reviewed) together."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from closedloop.config.common import TrainArgs, check_lora, check_name, check_range, check_train_args
from closedloop.config.core import ConfigError, enum_value, merge


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


class AblationIterations(str, Enum):
    all = "all"  # every policy_k of each ablation
    last = "last"  # each ablation's final policy only (the closed loop's are always all evaluated)


class MCScoring(str, Enum):
    loglikelihood = "loglikelihood"  # lm-evaluation-harness acc / acc_norm (the field's way)
    generate = "generate"  # decode, then read the option letter (our scorer)


class MathScoring(str, Enum):
    harness = "harness"  # lm-evaluation-harness extraction (GSM8K strict/flexible, hendrycks MATH)
    ours = "ours"  # closedloop.answers


class Decoding(str, Enum):
    greedy = "greedy"
    sampled = "sampled"  # sampled@k: mean accuracy of k samples, and pass@k
    self_consistency = "self_consistency"  # majority vote over k samples
    beam_self_eval = "beam_self_eval"  # SPEC §1 self-evaluation guided beam search
    coral_blockwise = "coral_blockwise"  # SPEC §5, a COrAL model only (coral_evaluate jobs)



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
    max_question_chars: int = 4000
    """Limits on a ``source: jsonl`` row (the other sources are known): longer rows are refused
    with their file and line, before a stage tries to tokenise or batch them (a 50 MB question
    once made evaluation allocate 11 GB). The longest built-in question (MATH-500) has < 2000."""
    max_answer_chars: int = 1000
    max_solution_chars: int = 16000
    """All of a row's ``solution_steps`` together."""
    max_choices: int = 10
    """Answer letters run A..J."""
    max_rows: int = 1_000_000
    """Rows per ``source: jsonl`` file."""


@dataclass
class SFTConfig(TrainArgs):
    """Supervised fine-tuning on gold step-by-step solutions (TRL SFTTrainer)."""

    task: str = "synthetic"
    max_length: int = 384
    group_by_length: bool = True
    """Batch examples of similar length (transformers' ``group_by_length`` sampler): 15%
    fewer padded tokens on the default training split (45 704 vs 53 424, measured)."""


@dataclass
class EvalConfig:
    """Held-out evaluation (SPEC §7)."""

    tasks: list[str] = field(default_factory=lambda: ["synthetic", "arc_challenge", "sciq"])
    models: list[str] = field(default_factory=lambda: ["sft"])
    """Models evaluated besides the loop's policies: ``base`` (untrained) and/or ``sft``."""
    ablation_iterations: AblationIterations = AblationIterations.all
    """Which policies of each ablation (``loop.ablations``) are evaluated: ``all`` iterations, or the
    ``last`` one only, which is what the comparison at equal budgets needs (it saves an evaluation
    per task for each earlier iteration of each ablation)."""
    split: Split = Split.heldout
    """``validation`` to choose settings without looking at the held-out split."""
    mc_scoring: MCScoring = MCScoring.loglikelihood
    """Multiple-choice tasks: ``loglikelihood`` of each choice through lm-evaluation-harness
    (acc, acc_norm) or ``generate`` (decode and read the letter; reports the invalid rate)."""
    math_scoring: MathScoring = MathScoring.harness
    """GSM8K/MATH tasks: the harness's extraction (GSM8K strict-match + flexible-extract, MATH
    hendrycks) or ``ours`` (:mod:`closedloop.answers`). The synthetic task always uses ours."""
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
class DPOConfig(TrainArgs):
    """Conservative DPO on step-level pairs (SPEC §3), one run per iteration."""

    learning_rate: float = 5e-6
    """Chosen on the synthetic validation split (docs/results.md: 2e-5 lost 5.5 points, 5e-6 held)."""
    weight_decay: float = 0.05
    logging_steps: int = 1
    beta: float = 0.1
    use_alpha: bool = True
    """Per-pair label smoothing α from the search; false trains plain DPO (α = 0)."""
    reference: Reference = Reference.sft
    min_q_margin: float = 0.5
    """Train only on pairs whose Q_w − Q_l exceeds this (0: all pairs, as SPEC §3; the search
    already drops exact ties). A training choice, so changing it reruns DPO, not the search.
    0.5 keeps pairs whose values differ by an outcome, not by self-evaluation noise."""
    max_length: int = 512
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



DATA_LIMITS = ("max_question_chars", "max_answer_chars", "max_solution_chars", "max_choices", "max_rows")
SAMPLING = (Decoding.sampled, Decoding.self_consistency)


def check_llm(cfg: DictConfig) -> None:
    """Every value of the LLM loop's sections in its range, and the cross-field checks types
    cannot express, when the config loads: a bad value fails before Snakemake plans (or
    deletes) anything. Temperatures must be > 0 where they sample (SPEC §1–2)."""
    _check_tasks(cfg)
    _check_eval(cfg)
    _check_mcts(cfg.mcts)
    check_train_args("sft", cfg.sft)
    check_range("sft.max_length", cfg.sft.max_length, 1)
    check_lora("model.lora", cfg.model.lora)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings"):
        check_range(f"model.tiny.{key}", cfg.model.tiny[key], 1)
    for name in cfg.loop.ablations:
        if name not in ABLATIONS:
            raise ConfigError(f"key 'loop.ablations': unknown ablation {name!r} (expected any of {list(ABLATIONS)})")
    check_range("loop.iterations", cfg.loop.iterations, 0)
    check_range("loop.instance_samples", cfg.loop.instance_samples, 2, why="a correct and an incorrect sample")
    _check_dpo(cfg)
    _check_decodings(cfg)


def _check_tasks(cfg: DictConfig) -> None:
    tasks = cfg.data.tasks
    for name in tasks:
        check_name(f"data.tasks.{name}", name)
    for key, names in (("eval.tasks", list(cfg.eval.tasks)), ("sft.task", [cfg.sft.task]),
                       ("mcts.task", [cfg.mcts.task]), ("decodings.tasks", list(cfg.decodings.tasks))):
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
        s = task.synthetic
        for key in ("min_steps", "max_start", "max_operand"):
            check_range(f"data.tasks.{name}.synthetic.{key}", s[key], 1)
        check_range(f"data.tasks.{name}.synthetic.max_steps", s.max_steps, s.min_steps,
                    why=f"data.tasks.{name}.synthetic.min_steps")
    for key in DATA_LIMITS:
        check_range(f"data.{key}", cfg.data[key], 1)
    for role, name in (("sft.task", cfg.sft.task), ("mcts.task", cfg.mcts.task)):
        if tasks[name].source == TaskSource.jsonl and not (tasks[name].train_path and tasks[name].n_train):
            raise ConfigError(f"key 'data.tasks.{name}': {role} trains on it, so it needs train_path and "
                              f"n_train >= 1")


def _check_eval(cfg: DictConfig) -> None:
    e = cfg.eval
    if len(set(cfg.seeds)) != len(cfg.seeds) or any(s < 0 for s in cfg.seeds):
        raise ConfigError(f"key 'seeds': expected distinct integers >= 0, got {list(cfg.seeds)}")
    check_range("eval.ci_level", e.ci_level, 0, 1, low_open=True, high_open=True)
    for key in ("batch_size", "k", "n_bootstrap", "max_new_tokens", "mc_max_new_tokens", "beam_k", "beam_n",
                "beam_max_steps", "beam_step_tokens"):
        check_range(f"eval.{key}", e[key], 1)
    for tag in e.models:
        if tag not in ("base", "sft"):
            raise ConfigError(f"key 'eval.models': unknown model tag {tag!r} (expected 'base' or 'sft')")
    used = {e.decoding, *cfg.decodings.methods}
    if used & set(SAMPLING):
        why = "it samples for " + ", ".join(sorted(enum_value(d) for d in used & set(SAMPLING)))
        check_range("eval.temperature", e.temperature, 0, low_open=True, why=why)
        check_range("eval.top_p", e.top_p, 0, 1, low_open=True, why=why)
    if Decoding.beam_self_eval in used:
        check_range("eval.beam_temperature", e.beam_temperature, 0, low_open=True, why="beam_self_eval samples")
        check_range("eval.beam_lambda", e.beam_lambda, 0, 1)
        check_range("eval.beam_tau", e.beam_tau, 0)
        check_range("eval.beam_tau_decay", e.beam_tau_decay, 0, 1)


def _check_mcts(m) -> None:
    for key in ("n_prompts", "n_shards", "trees_per_batch", "b1", "b2", "max_children", "simulations",
                "max_step_tokens", "max_completion_tokens", "generate_batch_size", "self_eval_batch_size"):
        check_range(f"mcts.{key}", m[key], 1)
    check_range("mcts.depth_limit", m.depth_limit, 2, why="one step, then a completion")
    check_range("mcts.n_shards", m.n_shards, 1, m.n_prompts, why="mcts.n_prompts: a shard per prompt at most")
    check_range("mcts.temperature", m.temperature, 0, low_open=True, why="the search samples its children")
    check_range("mcts.top_p", m.top_p, 0, 1, low_open=True)
    check_range("mcts.c_puct", m.c_puct, 0)
    check_range("mcts.prior_lambda", m.prior_lambda, 0, low_open=True)
    check_range("mcts.gamma", m.gamma, 0, 1)
    check_range("mcts.outcome_reward", m.outcome_reward, 0)


def _check_dpo(cfg: DictConfig) -> None:
    n = cfg.loop.iterations
    for k in cfg.dpo.per_iteration or {}:
        if not str(k).isdigit() or not 1 <= int(k) <= n:
            raise ConfigError(f"key 'dpo.per_iteration.{k}': expected an iteration number in 1..{n} "
                              f"(loop.iterations)")
    for k in range(1, n + 1):
        d = dpo_for(cfg, k)  # raises on a bad key or type
        key = f"dpo.per_iteration.{k}" if str(k) in (cfg.dpo.per_iteration or {}) else "dpo"
        check_train_args(key, d)
        check_range(f"{key}.beta", d.beta, 0, low_open=True)
        check_range(f"{key}.max_length", d.max_length, 1)
        check_range(f"{key}.min_q_margin", d.min_q_margin, 0)


def _check_decodings(cfg: DictConfig) -> None:
    dc, n = cfg.decodings, cfg.loop.iterations
    for tag in dc.models:
        match = re.fullmatch(r"iter(\d+)", tag)
        if tag not in ("base", "sft", "last") and not match:
            raise ConfigError(f"key 'decodings.models': unknown model tag {tag!r} "
                              "(expected base, sft, last or iter<k>)")
        if match and not 1 <= int(match.group(1)) <= n:
            raise ConfigError(f"key 'decodings.models': {tag!r} is not an iteration of the loop "
                              f"(expected iter1..iter{n}, loop.iterations = {n})")
    check_range("decodings.n_questions", dc.n_questions, 0)
    for key in ("samples", "beam_k", "beam_n"):
        check_range(f"decodings.{key}", dc[key], 1)



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




@dataclass
class LLMSections:
    """The LLM closed loop's sections of :class:`~closedloop.config.ExperimentConfig`."""

    seeds: list[int] = field(default_factory=list)
    """Empty: one run with ``seed`` (paths ``results/<experiment>/...``). ``[0, 1, 2]``: the
    experiment (SFT, search, DPO, evaluation, report) once per seed under
    ``results/<experiment>/seed<k>/``, on the same data (split with ``seed``), and a report
    over the seeds at ``results/<experiment>/report.md``."""
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mcts: MCTSConfig = field(default_factory=MCTSConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    decodings: DecodingsConfig = field(default_factory=DecodingsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
