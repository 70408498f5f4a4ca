# Shared helpers: the validated experiment config, the CLI call, per-job config views.
# Nothing here imports torch or transformers: parsing the DAG stays fast.
import json
import os
import sys
from pathlib import Path

from closedloop import config as cl_config
from closedloop import launch as cl_launch
from closedloop import paths

CFG = cl_config.from_dict(config, source=" + ".join(map(str, workflow.configfiles)) or "snakemake config")
# Where heavy stages run (local, or Slurm via submitit): the active profile's closedloop.yaml, passed to the
# rules' CLI calls through the environment, never through params (switching launcher reruns nothing).
LAUNCH = cl_launch.export_for_snakemake(sys.argv)
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


def report_targets():
    """The report (over seeds when ``seeds`` is set) and the DVC record of the data."""
    final = paths.seeds_report_file(CFG) if CFG.seeds else paths.report_file(CFG)
    return [str(final), f"{CFG.data_dir}.dvc"]
