# Shared helpers: the validated experiment config, the CLI call, per-job config views.
# Nothing here imports torch or transformers: parsing the DAG stays fast.
import json
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from closedloop import config as cl_config
from closedloop import launch as cl_launch
from closedloop import dvc_store, paths, sources

def _config_layers():
    """What Snakemake merged into `config`, in order and by name: the Snakefile's config file, each
    --configfile, then --config; a bad value's error names the one that set it."""
    cli_files = [str(f) for f in workflow.config_settings.configfiles]
    files = [str(f) for f in workflow.configfiles if str(f) not in cli_files] + cli_files
    layers = [(os.path.relpath(f), OmegaConf.to_container(cl_config.load_yaml(Path(f)))) for f in files]
    return layers + [("snakemake --config", dict(workflow.config_settings.config))]


CFG = cl_config.from_dict(config, source=" + ".join(map(str, workflow.configfiles)) or "snakemake config",
                          layers=_config_layers())
# Where heavy stages run (local, or Slurm via submitit): the active profile's closedloop.yaml, passed to the
# rules' CLI calls through the environment, never through params (switching launcher reruns nothing).
# Snakemake's own --default-resources/--set-resources (slurm_account, gpus, mem_mb, ...) travel the same way.
LAUNCH = cl_launch.export_for_snakemake(sys.argv, resource_settings=workflow.resource_settings)
envvars:
    "PATH",


# Rules call `closedloop`: the one installed beside the Python that runs Snakemake wins.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
LOGS = paths.run_dir(CFG) / "logs"
# The loop's own jobs (search, pair sampling, DPO) go first when cores are scarce: each
# iteration waits on the previous one, while evaluations can run whenever, so they fill
# the cores at the end instead of delaying the chain (measured: with equal priorities
# the default run's 2-thread loop jobs waited on 1-thread evaluations, one core idle).
LOOP_PRIORITY = 10


wildcard_constraints:
    task="|".join(CFG.data.tasks),
    model=r"base|sft|(ablations/[a-z_]+/)?iter\d+",
    loop=r"(ablations/[a-z_]+/)?",
    k=r"\d+",
    shard=r"\d+",
    decoding="greedy|sampled|self_consistency|beam_self_eval",


def view_json(stage, tasks=(), iteration=None, model=None):
    """The config sections a job depends on: a change elsewhere does not rerun it."""
    return json.dumps(cl_config.stage_view(CFG, stage, list(tasks), iteration, model), sort_keys=True)


def iterations():
    return range(1, CFG.loop.iterations + 1)


def policy_artifact(loop, k):
    """The artifact dir holding policy_k of the loop with prefix ``loop`` (policy_0 = SFT)."""
    if k == 0:
        return str(paths.sft_dir(CFG))
    return str(paths.dpo_dir(CFG, k, paths.variant_of_prefix(loop)))


def reference_artifact(loop, k):
    """The DPO reference of iteration k: the SFT model (SPEC §3) or policy_{k-1}."""
    return policy_artifact(loop, 0 if CFG.dpo.reference.value == "sft" else k - 1)


def model_artifact(tag):
    """The artifact dir an evaluation of model ``tag`` reads; none for the base model."""
    if tag == "base":
        return []
    if tag == "sft":
        return [str(paths.sft_dir(CFG))]
    variant, k = paths.parse_tag(tag)
    return [str(paths.dpo_dir(CFG, k, variant))]


def mcts_targets():
    """Merged MCTS data of every closed-loop iteration (reported)."""
    return [str(paths.mcts_dir(CFG, k) / "merged") for k in iterations()]


def eval_dirs():
    return [str(paths.eval_dir(CFG, m, t)) for m in paths.eval_model_tags(CFG) for t in CFG.eval.tasks]


def decoding_dirs():
    """The matched-budget decoding comparison (empty unless ``decodings.methods`` is set)."""
    return [str(paths.decoding_eval_dir(CFG, *run)) for run in paths.decoding_runs(CFG)]


def data_tasks():
    """Every task the DAG builds data for: the SFT task and each evaluated task."""
    needed = list(dict.fromkeys([*CFG.eval.tasks, *CFG.decodings.tasks]))
    for task in (CFG.sft.task, CFG.mcts.task):
        if task not in needed:
            needed.append(task)
    return needed


# ---- what a stage reads from outside the DAG (SPEC §7): rule inputs, or params that change with it

def data_files(wildcards):
    """A jsonl task's own files: editing one reruns its data job and everything downstream."""
    return list(sources.task_files(CFG.data.tasks[wildcards.task]).values())


def task_source(wildcards):
    """The installed data package a benchmark task's rows come from, with its version."""
    return json.dumps(sources.task_data(CFG.data.tasks[wildcards.task]), sort_keys=True)


BASE_MODEL = json.dumps(sources.base_model(CFG.model), sort_keys=True)
"""The embedded model's package version and file hash (``model.kind`` embedded or tiny): a param
of the stages that read the base model, so a new package reruns them."""


def base_model_source(wildcards):
    """Only the evaluation of the base model reads it; the others read a trained policy."""
    return BASE_MODEL if wildcards.model == "base" else ""


# ---- the default target: one per family in ``families`` (SPEC §1–4)

def loop_last_policy():
    """The closed loop's last policy (policy_N; SFT when ``loop.iterations`` is 0): the artifact
    that ``vlm.model.text_backbone: loop_policy`` builds the VLM's language model from."""
    return policy_artifact("", CFG.loop.iterations)


def family_targets():
    """The report of each family in ``families`` (loop: SPEC §1–3, vlm: §4, coral: §5, vlcot: §6)."""
    return [str(f) for f in paths.family_reports(CFG).values()]


def data_targets():
    """Every data artifact of the experiment's families (tracked together by data/<experiment>.dvc,
    so `dvc add` starts only after every data job of the run wrote its directory)."""
    tasks = data_tasks() if {"loop", "coral"} & set(CFG.families) else []
    if "coral" in CFG.families:
        tasks += [t for t in (CFG.coral.task, *CFG.coral.eval_tasks) if t not in tasks]
    dirs = [str(paths.data_dir(CFG, t)) for t in tasks]
    dirs += [str(paths.vlm_data_dir(CFG))] if "vlm" in CFG.families else []
    return dirs + ([str(paths.vlcot_data_dir(CFG))] if "vlcot" in CFG.families else [])


def dvc_views():
    """The experiment's metrics.json files and training logs, relative to results/<experiment>/."""
    run = paths.run_dir(CFG)
    metric_dirs, log_dirs = [], []
    if "loop" in CFG.families:
        metric_dirs += eval_dirs() + decoding_dirs()
        log_dirs += [paths.sft_dir(CFG)] + [paths.dpo_dir(CFG, k, v) for v in paths.loop_variants(CFG)
                                            for k in iterations()]
    if "vlm" in CFG.families:
        metric_dirs += [paths.pope_dir(CFG, m) for m in CFG.vlm.pope.models]
        log_dirs += [paths.vlm_sft_dir(CFG)] + [paths.vdpo_dir(CFG, m) for m in ("dpo", "vdpo")
                                                if m in CFG.vlm.pope.models]
    if "coral" in CFG.families:
        metric_dirs += [paths.coral_eval_dir(CFG, d, t) for d, t in paths.coral_eval_runs(CFG)]
        log_dirs += [paths.coral_stage_dir(CFG, s) for s in (1, 2)]
    if "vlcot" in CFG.families:
        metric_dirs += [paths.vlcot_eval_dir(CFG, t) for t in paths.vlcot_model_tags(CFG)]
        rounds = CFG.vlcot.rejection.rounds
        log_dirs += [paths.vlcot_sft_dir(CFG, v) for v in CFG.vlcot.sft.variants
                     if v in CFG.vlcot.eval.models or (v == "vision" and rounds)]
        log_dirs += [paths.vlcot_round_dir(CFG, k) for k in range(1, rounds + 1)]
    return {"metrics": [(Path(d) / "metrics.json").relative_to(run).as_posix() for d in metric_dirs],
            "training_logs": [(Path(d) / "train_log.csv").relative_to(run).as_posix() for d in log_dirs]}


def report_targets():
    targets = family_targets()
    return targets + [str(paths.data_dvc_file(CFG)), str(paths.dvc_views_file(CFG))]


def vlm_text_backbone():
    """``vlm.model.text_backbone: loop_policy``: the loop's last policy artifact is vlm_sft's input."""
    return [loop_last_policy()] if cl_config.enum_value(CFG.vlm.model.text_backbone) == "loop_policy" else []


def vlm_text_backbone_model():
    """The from_pretrained dir vlm_sft builds its language model from (``job.model``), or None."""
    if cl_config.enum_value(CFG.vlm.model.text_backbone) != "loop_policy":
        return None
    return str(paths.policy_dir(CFG, CFG.loop.iterations))
