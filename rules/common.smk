# Shared helpers: the validated experiment config, the CLI call, per-job config views.
import json
import os
import sys
from pathlib import Path

from closedloop import config as cl_config
from closedloop import paths

CFG = cl_config.from_dict(config, source=" + ".join(map(str, workflow.configfiles)) or "snakemake config")
envvars:
    "PATH",


# Rules call `closedloop`: the one installed beside the Python that runs Snakemake wins.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
LOGS = paths.run_dir(CFG) / "logs"


wildcard_constraints:
    task="|".join(CFG.data.tasks),
    model="base|sft",
    k=r"\d+",
    shard=r"\d+",


def view_json(stage, tasks=()):
    """The config sections a job depends on: a change elsewhere does not rerun it."""
    return json.dumps(cl_config.stage_view(CFG, stage, list(tasks)), sort_keys=True)


def policy_artifact(k):
    """The artifact dir that holds policy_k (SPEC §3: policy_0 is the SFT model)."""
    return str(paths.sft_dir(CFG) if k == 0 else paths.policy_dir(CFG, k).parent)


def mcts_targets():
    return [str(paths.mcts_dir(CFG, 1) / "merged")]


def eval_dirs():
    return [str(paths.eval_dir(CFG, m, t)) for m in CFG.eval.models for t in CFG.eval.tasks]


def data_tasks():
    """Every task the DAG builds data for: the SFT task and each evaluated task."""
    needed = list(CFG.eval.tasks)
    for task in (CFG.sft.task, CFG.mcts.task):
        if task not in needed:
            needed.append(task)
    return needed


def report_targets():
    return [str(paths.report_file(CFG)), f"{CFG.data_dir}.dvc"]
