"""Where every artifact lives. Snakemake rules and stage code share these functions,
so the DAG and the stages can never disagree about a path.

Iterations of the closed loop live in ``results/<experiment>/iter<k>/``; those of a loop
ablation in ``results/<experiment>/ablations/<variant>/iter<k>/``. With ``seeds`` set, each
seed's run lives in ``results/<experiment>/seed<k>/`` (same layout below it) and the report
over seeds in ``results/<experiment>/report.md``; ``data/<experiment>/`` is shared.
"""

from __future__ import annotations

import copy
from pathlib import Path

from closedloop import config as cl_config

CLOSED_LOOP = "closedloop"


def data_dir(cfg, task: str) -> Path:
    """``data/<experiment>/<task>/``: train.jsonl (when the task has one), heldout.jsonl,
    validation.jsonl (empty unless ``n_validation`` > 0)."""
    return Path(cfg.data_dir) / cfg.experiment / task


def experiment_dir(cfg) -> Path:
    return Path(cfg.results_dir) / cfg.experiment


def run_dir(cfg) -> Path:
    """``results/<experiment>/``, or ``results/<experiment>/seed<seed>/`` under ``seeds``."""
    return experiment_dir(cfg) / f"seed{cfg.seed}" if cfg.get("seeds") else experiment_dir(cfg)


def for_seed(cfg, seed: int):
    """``cfg`` with ``seed`` set: the config of one seed's run under ``seeds``."""
    out = copy.deepcopy(cfg)
    out.seed = seed
    return out


def seeds_report_file(cfg) -> Path:
    """``results/<experiment>/report.md``: per-seed scores, mean ± sd, paired gains over SFT."""
    return experiment_dir(cfg) / "report.md"


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


def reference_dir(cfg, reference: str, k: int, variant: str = CLOSED_LOOP) -> Path:
    """The from_pretrained dir of the DPO reference of iteration k: the SFT model (``sft``,
    SPEC §3) or policy_{k−1} (``previous``)."""
    return policy_dir(cfg, 0) if reference == "sft" else policy_dir(cfg, k - 1, variant)


def mcts_dir(cfg, k: int | str, variant: str = CLOSED_LOOP) -> Path:
    """``.../iter<k>/mcts/``: shards/<i>/ and merged/ (trees.jsonl, pairs.jsonl, stats.json)."""
    return iter_dir(cfg, k, variant) / "mcts"


def mcts_shard_dir(cfg, k: int | str, shard: int | str, variant: str = CLOSED_LOOP) -> Path:
    return mcts_dir(cfg, k, variant) / "shards" / str(shard)


def instance_dir(cfg, k: int | str, variant: str = "instance_online") -> Path:
    """``.../iter<k>/instance/``: sampled full solutions and instance-level pairs."""
    return iter_dir(cfg, k, variant) / "instance"


def pairs_artifact(cfg, k: int, variant: str = CLOSED_LOOP) -> Path:
    """The artifact dir whose ``pairs.jsonl`` trains policy_k of ``variant``. Every MCTS
    variant's first search runs the SFT policy with the same search config and seed, so
    iteration 1 of each reads the closed loop's iteration-1 search instead of repeating it;
    offline MCTS reads it at every iteration; instance-level online reads its own samples."""
    if variant == "instance_online":
        return instance_dir(cfg, k)
    if variant == "offline_mcts" or int(k) == 1:
        return mcts_dir(cfg, 1) / "merged"
    return mcts_dir(cfg, k, variant) / "merged"


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


# ---- the V-DPO branch (SPEC §4): results/<experiment>/vlm/ -------------------------------

VLM_MODELS = ("sft", "dpo", "vdpo")
"""Model tags of the branch: the SFT model, the plain-DPO ablation (γ = 1) and V-DPO."""


def vlm_data_dir(cfg) -> Path:
    """``data/<experiment>/vlm/``: images/, scenes.jsonl, sft.jsonl, pope.jsonl, val.jsonl, stats.json."""
    return Path(cfg.data_dir) / cfg.experiment / "vlm"


def vlm_run_dir(cfg) -> Path:
    return run_dir(cfg) / "vlm"


def vlm_sft_dir(cfg) -> Path:
    """``results/<experiment>/vlm/sft/``: model/, train_log.csv, vision_log.csv, heads.safetensors."""
    return vlm_run_dir(cfg) / "sft"


def vdpo_pairs_dir(cfg) -> Path:
    """``results/<experiment>/vlm/pairs/``: pairs.jsonl, edited/ (PNG), stats.json."""
    return vlm_run_dir(cfg) / "pairs"


def vdpo_dir(cfg, tag: str) -> Path:
    """``results/<experiment>/vlm/<dpo|vdpo>/``: model/, train_log.csv, stats.json."""
    if tag not in ("dpo", "vdpo"):
        raise cl_config.ConfigError(f"key 'job.variant': expected 'dpo' or 'vdpo', got {tag!r}")
    return vlm_run_dir(cfg) / tag


def vlm_model_dir(cfg, tag: str) -> Path:
    """The from_pretrained dir of VLM model ``tag`` (one of :data:`VLM_MODELS`)."""
    if tag not in VLM_MODELS:
        raise cl_config.ConfigError(f"key 'vlm.pope.models': unknown model {tag!r} (expected one of {list(VLM_MODELS)})")
    return (vlm_sft_dir(cfg) if tag == "sft" else vdpo_dir(cfg, tag)) / "model"


def pope_dir(cfg, tag: str) -> Path:
    """``results/<experiment>/vlm/pope/<tag>/``: predictions.jsonl, metrics.json."""
    return vlm_run_dir(cfg) / "pope" / tag


def vlm_report_file(cfg) -> Path:
    return vlm_run_dir(cfg) / "report.md"
