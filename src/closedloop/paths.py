"""Where every artifact lives. Snakemake rules and stage code share these functions,
so the DAG and the stages can never disagree about a path.

Iterations of the closed loop live in ``results/<experiment>/iter<k>/``; those of a loop
ablation in ``results/<experiment>/ablations/<variant>/iter<k>/``.
"""

from __future__ import annotations

from pathlib import Path

from closedloop import config as cl_config

CLOSED_LOOP = "closedloop"


def data_dir(cfg, task: str) -> Path:
    """``data/<experiment>/<task>/``: train.jsonl (when the task has one), heldout.jsonl,
    validation.jsonl (empty unless ``n_validation`` > 0)."""
    return Path(cfg.data_dir) / cfg.experiment / task


def run_dir(cfg) -> Path:
    return Path(cfg.results_dir) / cfg.experiment


def sft_dir(cfg) -> Path:
    """``results/<experiment>/sft/``: model/ (from_pretrained dir), train_log.csv."""
    return run_dir(cfg) / "sft"


LOOP_WILDCARD = "{loop}"


def variant_prefix(variant: str) -> str:
    """Where a loop variant's iterations live under the run dir: "" for the closed loop,
    ``ablations/<variant>/`` otherwise. Snakemake rules pass their ``{loop}`` wildcard
    (that prefix itself) through unchanged."""
    if variant == LOOP_WILDCARD:
        return variant
    return "" if variant == CLOSED_LOOP else f"ablations/{variant}/"


def variant_of_prefix(prefix: str) -> str:
    """Inverse of :func:`variant_prefix`."""
    return prefix.removeprefix("ablations/").rstrip("/") or CLOSED_LOOP


def iter_dir(cfg, k: int | str, variant: str = CLOSED_LOOP) -> Path:
    return run_dir(cfg) / f"{variant_prefix(variant)}iter{k}"


def dpo_dir(cfg, k: int | str, variant: str = CLOSED_LOOP) -> Path:
    """``.../iter<k>/dpo/``: model/ (policy_k) and train_log.csv."""
    return iter_dir(cfg, k, variant) / "dpo"


def policy_dir(cfg, k: int | str, variant: str = CLOSED_LOOP) -> Path:
    """policy_k's from_pretrained dir; policy_0 is the SFT model (SPEC §3)."""
    return sft_dir(cfg) / "model" if int(k) == 0 else dpo_dir(cfg, k, variant) / "model"


def mcts_dir(cfg, k: int | str, variant: str = CLOSED_LOOP) -> Path:
    """``.../iter<k>/mcts/``: shards/<i>/ and merged/ (trees.jsonl, pairs.jsonl, stats.json)."""
    return iter_dir(cfg, k, variant) / "mcts"


def mcts_shard_dir(cfg, k: int | str, shard: int | str, variant: str = CLOSED_LOOP) -> Path:
    return mcts_dir(cfg, k, variant) / "shards" / str(shard)


def instance_dir(cfg, k: int | str, variant: str = "instance_online") -> Path:
    """``.../iter<k>/instance/``: sampled full solutions and instance-level pairs."""
    return iter_dir(cfg, k, variant) / "instance"


def model_tag(k: int, variant: str = CLOSED_LOOP) -> str:
    """Evaluation tag of policy_k of a loop variant: ``iter2`` or ``ablations/plain_dpo/iter2``."""
    return f"{variant_prefix(variant)}iter{k}"


def parse_tag(tag: str) -> tuple[str, int] | None:
    """(variant, k) of an iteration tag; None for ``base`` and ``sft``."""
    if tag in ("base", "sft"):
        return None
    prefix, _, k = tag.rpartition("iter")
    return variant_of_prefix(prefix), int(k)


def model_dir(cfg, tag: str) -> Path | None:
    """The from_pretrained dir of a model tag; ``None`` for the (untrained) base model."""
    if tag == "sft":
        return sft_dir(cfg) / "model"
    parsed = parse_tag(tag)
    return None if parsed is None else policy_dir(cfg, parsed[1], parsed[0])


def eval_dir(cfg, model: str, task: str) -> Path:
    """``results/<experiment>/eval/<model tag>/<task>/``: predictions.jsonl, metrics.json."""
    return run_dir(cfg) / "eval" / model / task


def decoding_eval_dir(cfg, model: str, task: str, decoding: str) -> Path:
    """``results/<experiment>/decodings/<model tag>/<task>/<decoding>/``: one side of the
    matched-budget comparison of decodings."""
    return run_dir(cfg) / "decodings" / model / task / decoding


def decoding_model_tags(cfg) -> list[str]:
    """``decodings.models`` with ``last`` resolved to the closed loop's final policy."""
    last = model_tag(cfg.loop.iterations) if cfg.loop.iterations else "sft"
    return list(dict.fromkeys(last if tag == "last" else tag for tag in cfg.decodings.models))


def decoding_runs(cfg) -> list[tuple[str, str, str]]:
    """(model tag, task, decoding) of every job in the decoding comparison."""
    return [(tag, task, cl_config.enum_value(d)) for tag in decoding_model_tags(cfg)
            for task in cfg.decodings.tasks for d in cfg.decodings.methods]


def report_file(cfg) -> Path:
    return run_dir(cfg) / "report.md"


def plots_dir(cfg) -> Path:
    return run_dir(cfg) / "plots"


def loop_variants(cfg) -> list[str]:
    """The closed loop plus the ablations switched on in ``loop.ablations``."""
    return [CLOSED_LOOP, *cfg.loop.ablations]


def eval_model_tags(cfg) -> list[str]:
    """Every model the experiment evaluates: ``eval.models`` plus policy_1..N of each loop."""
    return list(cfg.eval.models) + [model_tag(k, v) for v in loop_variants(cfg)
                                    for k in range(1, cfg.loop.iterations + 1)]
