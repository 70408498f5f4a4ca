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


def data_root(cfg) -> Path:
    """``data/<experiment>/``: every data artifact of one experiment, tracked by DVC as one unit."""
    return Path(cfg.data_dir) / cfg.experiment


def data_dvc_file(cfg) -> Path:
    """``data/<experiment>.dvc``: one per experiment, so running one never rewrites another's."""
    root = data_root(cfg)
    return root.with_name(root.name + ".dvc")


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


def dvc_views_file(cfg) -> Path:
    """``results/<experiment>/dvc.yaml``: the experiment's metrics and training curves for
    ``dvc metrics show|diff`` and ``dvc plots show`` (top-level entries, no stages)."""
    return run_dir(cfg) / "dvc.yaml"


def report_file(cfg) -> Path:
    return run_dir(cfg) / "report.md"


def report_rst(cfg) -> Path:
    """report.md as reStructuredText with the run's overview: the HTML report's landing page."""
    return run_dir(cfg) / "report.rst"


def plots_dir(cfg) -> Path:
    return run_dir(cfg) / "plots"


def loop_variants(cfg) -> list[str]:
    """The closed loop plus the ablations switched on in ``loop.ablations``."""
    return [CLOSED_LOOP, *cfg.loop.ablations]


def evaluated_iterations(cfg, variant: str = CLOSED_LOOP) -> list[int]:
    """The iterations k whose policy_k of ``variant`` is evaluated: 1..N, or only N for an
    ablation under ``eval.ablation_iterations: last``."""
    every = list(range(1, cfg.loop.iterations + 1))
    if variant == CLOSED_LOOP or cl_config.enum_value(cfg.eval.ablation_iterations) == "all":
        return every
    return every[-1:]


def eval_model_tags(cfg) -> list[str]:
    """Every model the experiment evaluates: ``eval.models`` plus the evaluated policies of each
    loop (:func:`evaluated_iterations`)."""
    return list(cfg.eval.models) + [model_tag(k, v) for v in loop_variants(cfg) for k in evaluated_iterations(cfg, v)]


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


def vlm_report_rst(cfg) -> Path:
    return vlm_run_dir(cfg) / "report.rst"


def vlm_seeds_report_file(cfg) -> Path:
    """``results/<experiment>/vlm/report.md`` under ``seeds``: POPE per seed, mean ± sd, paired gains
    over SFT; each seed's own branch report is ``results/<experiment>/seed<k>/vlm/report.md``."""
    return experiment_dir(cfg) / "vlm" / "report.md"


# ---- the VL-CoT family (SPEC §6): results/<experiment>/vlcot/ ------------------------------

def vlcot_data_dir(cfg) -> Path:
    """``data/<experiment>/vlcot/``: images/, masks/, scenes.jsonl, {train,validation,heldout}.jsonl, stats.json."""
    return Path(cfg.data_dir) / cfg.experiment / "vlcot"


def vlcot_run_dir(cfg) -> Path:
    return run_dir(cfg) / "vlcot"


def vlcot_sft_dir(cfg, variant: str) -> Path:
    """``results/<experiment>/vlcot/sft/<direct|text|vision>/``: model/, vision_head.safetensors, train_log.csv."""
    return vlcot_run_dir(cfg) / "sft" / variant


def vlcot_round_dir(cfg, k: int | str) -> Path:
    """``results/<experiment>/vlcot/rejection/round<k>/``: model/, vision_head.safetensors, samples.jsonl,
    kept.jsonl, agreement.json, train_log.csv."""
    return vlcot_run_dir(cfg) / "rejection" / f"round{k}"


def vlcot_model_tags(cfg) -> list[str]:
    """Every model the family evaluates: ``vlcot.eval.models`` plus ``round1..R``."""
    return list(cfg.vlcot.eval.models) + [f"round{k}" for k in range(1, cfg.vlcot.rejection.rounds + 1)]


def vlcot_model_artifact(cfg, tag: str) -> Path | None:
    """The artifact dir holding model ``tag`` (None for ``base``); ``round0`` is the vision SFT model."""
    if tag == "base":
        return None
    if tag.startswith("round"):
        k = int(tag.removeprefix("round"))
        return vlcot_sft_dir(cfg, "vision") if k == 0 else vlcot_round_dir(cfg, k)
    return vlcot_sft_dir(cfg, tag)


def vlcot_model_inputs(cfg, tag: str) -> list[str]:
    """The artifact dirs a job reading model ``tag`` depends on: none for ``base``."""
    directory = vlcot_model_artifact(cfg, tag)
    return [str(directory)] if directory else []


def vlcot_eval_dir(cfg, tag: str) -> Path:
    """``results/<experiment>/vlcot/eval/<tag>/``: predictions.jsonl, metrics.json."""
    return vlcot_run_dir(cfg) / "eval" / tag


def vlcot_report_file(cfg) -> Path:
    return vlcot_run_dir(cfg) / "report.md"


# ---- COrAL (SPEC §5): results/<experiment>/coral/ ------------------------------------------

def coral_input_tag(cfg) -> str:
    """The model tag COrAL post-trains: the closed loop's last policy (``coral.init: last``;
    the SFT model when the loop has no iterations) or the SFT model (``sft``)."""
    if cl_config.enum_value(cfg.coral.init) == "sft" or not cfg.loop.iterations:
        return "sft"
    return model_tag(cfg.loop.iterations)


def coral_run_dir(cfg) -> Path:
    return run_dir(cfg) / "coral"


def coral_stage_dir(cfg, stage: int) -> Path:
    """``results/<experiment>/coral/stage<1|2>/``: model/ (from_pretrained dir with the
    ``coral`` marker in config.json), train_log.csv, stats.json."""
    return coral_run_dir(cfg) / f"stage{stage}"


def coral_model_dir(cfg) -> Path:
    """The COrAL model after both stages."""
    return coral_stage_dir(cfg, 2) / "model"


def coral_eval_dir(cfg, decoding: str, task: str) -> Path:
    """``results/<experiment>/coral/eval/<greedy|coral_blockwise>/<task>/``: predictions.jsonl, metrics.json."""
    return coral_run_dir(cfg) / "eval" / decoding / task


def coral_eval_runs(cfg) -> list[tuple[str, str]]:
    """(decoding, task) of every evaluation of the COrAL model."""
    return [(cl_config.enum_value(d), task) for d in cfg.coral.eval_decodings for task in cfg.coral.eval_tasks]


def coral_report_file(cfg) -> Path:
    return coral_run_dir(cfg) / "report.md"


def family_reports(cfg) -> dict[str, Path]:
    """The report each family in ``families`` ends in: the default target ``all`` builds these
    (the loop's and the V-DPO branch's: their reports over seeds under ``seeds``)."""
    seeds = bool(cfg.get("seeds"))
    files = {"loop": seeds_report_file if seeds else report_file, "vlm": vlm_seeds_report_file if seeds else vlm_report_file,
             "coral": coral_report_file, "vlcot": vlcot_report_file}
    return {family: files[family](cfg) for family in cfg.families}
