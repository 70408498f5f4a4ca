"""Run a stage in this process (``local``) or as a Slurm job through submitit (``slurm``).

Longer than 400 lines because the launch settings schema, the resources and the submit-and-wait
loop of the one Slurm launcher are read together.

Every Snakemake rule calls ``closedloop run-stage``; the rule itself always runs on the
machine that runs Snakemake. With the ``slurm`` launcher the CLI submits the stage with
submitit, waits for it and fails with the job's state, log paths and stderr tail when it
fails or is cancelled. One scheduler per job: Snakemake never talks to Slurm itself.

The launch settings are *not* part of the experiment config: they never enter a stage's
config view, so switching launcher or resources never invalidates a finished artifact.
They come from YAML files named in ``$CLOSEDLOOP_LAUNCH_CONFIG`` (``:``-separated, later
files win), which the Snakefile sets to the active profile's ``closedloop.yaml``
(``workflow/profiles/slurm/closedloop.yaml``); ``$CLOSEDLOOP_LAUNCHER`` overrides the
launcher. Schema: :class:`LaunchConfig`.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig, OmegaConf

from closedloop import config as cl_config
from closedloop import paths, stage_table

ENV_FILES = "CLOSEDLOOP_LAUNCH_CONFIG"
ENV_LAUNCHER = "CLOSEDLOOP_LAUNCHER"
PROFILE_FILE = "closedloop.yaml"
TRAINING = tuple(stage_table.names(stage_table.TRAINING))
"""Stages that may run several ranks (torch.distributed through the HF Trainer)."""
HEAVY = tuple(stage_table.names(stage_table.HEAVY)) + TRAINING
"""Stages that go to Slurm under the slurm launcher (the stage table's launch class); the others
stay where Snakemake runs."""


class Launcher(str, Enum):
    local = "local"
    slurm = "slurm"


@dataclass
class SlurmResources:
    """sbatch resources of one stage; ``None`` falls back to ``slurm.defaults``."""

    gpus_per_node: int | None = None
    tasks_per_node: int | None = None
    """Ranks per node; default: the GPUs per node for sft/dpo (one rank per GPU), 1 otherwise."""
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    timeout_min: int | None = None
    partition: str | None = None
    account: str | None = None
    constraint: str | None = None
    qos: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Further sbatch parameters, e.g. ``{reservation: x, exclusive: true}``."""


def _default_resources() -> SlurmResources:
    return SlurmResources(gpus_per_node=0, cpus_per_task=2, mem_gb=8, timeout_min=240)


@dataclass
class SlurmConfig:
    """How heavy stages are submitted: defaults, per-stage overrides, waiting and requeueing."""

    defaults: SlurmResources = field(default_factory=_default_resources)
    resources: dict[str, SlurmResources] = field(default_factory=dict)
    """Per stage (any of :data:`HEAVY`), merged over ``defaults``."""
    job_name_prefix: str = "cl"
    log_dir: str | None = None
    """submitit's folder (one subdir per job); default ``<results_dir>/<experiment>/logs/slurm``."""
    poll_seconds: float = 10.0
    """How often the waiting CLI asks sacct for the job state."""
    signal_delay_s: int = 120
    """USR2 this long before the time limit: the job checkpoints and requeues itself."""
    max_requeues: int = 3
    """Requeues after a timeout before the job counts as failed (preemptions are unlimited)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the batch script before the stage (``module load cuda``, ...)."""
    stderr_tail_lines: int = 40


@dataclass
class LaunchConfig:
    """Where stages run; never part of a stage's config view."""

    launcher: Launcher = Launcher.local
    checkpoint_steps: int = 0
    """sft/dpo save a Trainer checkpoint every N optimizer steps into the stage's work dir and
    resume from the latest one when restarted (requeue, preemption, rerun); 0: no checkpoints."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


def load_settings(files: list[str | Path] = (), launcher: str | None = None) -> DictConfig:
    """Defaults ← each YAML file ← ``launcher``; errors name the file and the dotted key."""
    cfg = OmegaConf.structured(LaunchConfig)
    for path in files:
        cfg = cl_config.merge(cfg, cl_config.load_yaml(Path(path)), str(path))
    if launcher:
        cfg = cl_config.merge(cfg, {"launcher": launcher}, f"${ENV_LAUNCHER}")
    unknown = sorted(set(cfg.slurm.resources) - set(HEAVY))
    if unknown:
        raise cl_config.ConfigError(f"{files[-1] if files else 'launch config'}: key 'slurm.resources.{unknown[0]}': "
                                    f"not a stage that runs on Slurm (expected one of {list(HEAVY)})")
    return cfg


def settings(environ=os.environ) -> DictConfig:
    """The launch settings of this process, from ``$CLOSEDLOOP_LAUNCH_CONFIG`` and ``$CLOSEDLOOP_LAUNCHER``."""
    files = [f for f in environ.get(ENV_FILES, "").split(os.pathsep) if f]
    return load_settings(files, environ.get(ENV_LAUNCHER) or None)


def checkpoint_steps() -> int:
    return int(settings().checkpoint_steps)


def profile_settings_file(argv: list[str], environ=os.environ) -> Path | None:
    """The ``closedloop.yaml`` of the profile Snakemake was started with, if it has one.

    Snakemake does not tell a workflow which ``--profile`` is active, and a profile's own
    ``config:``/``configfiles:`` are replaced by any ``--config``/``--configfile`` on the
    command line, so the launch settings live in a file beside the profile and are found
    from the command line (or ``$SNAKEMAKE_PROFILE``) the way Snakemake finds the profile.
    """
    import argparse

    from snakemake.cli import get_profile_dir

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--profile", action="append", default=[])
    names = parser.parse_known_args(argv[1:])[0].profile or [environ.get("SNAKEMAKE_PROFILE", "")]
    found = None
    for name in (n for n in names if n and n != "none"):
        located = get_profile_dir(name)
        if located and (Path(located[1]).parent / PROFILE_FILE).is_file():
            found = Path(located[1]).parent / PROFILE_FILE
    return found


def export_for_snakemake(argv: list[str], environ=os.environ) -> DictConfig:
    """Called by the Snakefile: put the active profile's launch file in front of
    ``$CLOSEDLOOP_LAUNCH_CONFIG`` (so the rules' CLI calls inherit it) and validate it now."""
    profile_file = profile_settings_file(argv, environ)
    files = [f for f in environ.get(ENV_FILES, "").split(os.pathsep) if f]
    if profile_file is not None and str(profile_file.resolve()) not in files:
        files.insert(0, str(profile_file.resolve()))
    environ[ENV_FILES] = os.pathsep.join(files)
    return settings(environ)


# ---- units and resources -------------------------------------------------------------


def units(stage: str, cfg: DictConfig) -> list[DictConfig]:
    """The independent jobs of one CLI call: every shard of an MCTS iteration, or the call itself."""
    if stage == "mcts" and cfg.job.shard is None:
        out = []
        for shard in range(cfg.mcts.n_shards):
            unit = cfg.copy()
            unit.job.shard = shard
            out.append(unit)
        return out
    return [cfg]


def job_name(stage: str, cfg: DictConfig, prefix: str) -> str:
    """``cl-sft``, ``cl-mcts-iter1``, ``cl-dpo-iter2``, ``cl-evaluate-sft-synthetic``, ..."""
    job = cfg.job
    parts = [prefix, stage]
    if stage in ("mcts", "dpo", "instance"):
        variant = job.variant if stage != "instance" else "instance_online"
        parts.append(paths.model_tag(job.iteration or 1, variant).replace("/", "-"))
    elif stage.startswith("evaluate"):
        parts += [str(job.model).replace("/", "-"), str(job.task)]
        if job.get("decoding"):  # evaluate_decoding (the decoding comparison)
            parts.append(str(job.decoding))
    return "-".join(parts)


def resources(stage: str, slurm: DictConfig) -> dict:
    """``slurm.defaults`` with ``slurm.resources.<stage>`` merged over it, as a plain dict."""
    merged = OmegaConf.to_container(slurm.defaults)
    own = slurm.resources.get(stage)
    for key, value in (OmegaConf.to_container(own) if own is not None else {}).items():
        if key == "extra":
            merged["extra"] = {**merged.get("extra", {}), **value}
        elif value is not None:
            merged[key] = value
    gpus = merged.get("gpus_per_node") or 0
    if merged.get("tasks_per_node") is None:
        merged["tasks_per_node"] = max(gpus, 1) if stage in TRAINING else 1
    if merged["tasks_per_node"] > 1 and stage not in TRAINING:
        raise cl_config.ConfigError(f"key 'slurm.resources.{stage}.tasks_per_node': {stage} runs one rank "
                                    f"(expected 1, got {merged['tasks_per_node']}); only {list(TRAINING)} run several")
    return merged


def executor_parameters(res: dict, name: str, slurm: DictConfig) -> dict:
    """submitit ``AutoExecutor.update_parameters`` keywords for resources ``res``."""
    params = {
        "name": name,
        "nodes": 1,
        "tasks_per_node": res["tasks_per_node"],
        "gpus_per_node": res.get("gpus_per_node") or None,
        "cpus_per_task": res.get("cpus_per_task"),
        "mem_gb": res.get("mem_gb"),
        "timeout_min": res.get("timeout_min"),
        "slurm_signal_delay_s": slurm.signal_delay_s,
        "slurm_setup": list(slurm.setup),
    }
    for key in ("partition", "account", "constraint", "qos"):
        if res.get(key):
            params[f"slurm_{key}"] = res[key]
    if res["tasks_per_node"] > 1:
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]  # one rank failing ends the others
    if res.get("extra"):
        params["slurm_additional_parameters"] = dict(res["extra"])
    return {k: v for k, v in params.items() if v is not None}


# ---- running ---------------------------------------------------------------------------


def stage_function(stage: str):
    """The entry function of ``stage`` (the stage table's row), imported only now: in the
    process that runs it, never in Snakemake's or a waiting one."""
    module, function = stage_table.stage(stage).entry.split(":")
    return getattr(importlib.import_module(module), function)


class StageJob(submitit.helpers.Checkpointable):
    """The callable submitit pickles: runs one stage unit in the job, on every rank.

    A ``submitit.helpers.Checkpointable``: on USR2 (preemption, or ``signal_delay_s`` before
    the time limit) submitit requeues the same call; the stage then resumes from what it
    left in its work dir (HF Trainer checkpoints for sft/dpo, finished tree batches for
    MCTS). Its artifact is only renamed into place once complete.
    """

    def __init__(self, stage: str, cwd: str):
        self.stage, self.cwd = stage, cwd

    def __call__(self, cfg: DictConfig) -> str:
        os.chdir(self.cwd)
        os.environ[ENV_LAUNCHER] = Launcher.local.value  # never submit again from inside the job
        env = submitit.JobEnvironment()
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:  # the rule's OMP_NUM_THREADS counted Snakemake's cores, not this job's CPUs
            import torch

            os.environ["OMP_NUM_THREADS"] = cpus
            torch.set_num_threads(int(cpus))
        if env.num_tasks > 1:
            import torch

            if not torch.cuda.is_available():
                os.environ["ACCELERATE_USE_CPU"] = "true"  # the HF Trainer only goes distributed (gloo) on CPU with it
            dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            print(f"closedloop: rank {dist.rank}/{dist.world_size} (local {dist.local_rank}) "
                  f"master {dist.master_addr}:{dist.master_port}", flush=True)
        stage_function(self.stage)(cfg)
        return f"{self.stage} done in job {env.job_id} rank {env.global_rank}"

    def checkpoint(self, *args, **kwargs):
        print("closedloop: checkpoint signal: requeueing; the stage resumes from its work dir", flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def run_stage(stage: str, cfg: DictConfig, launch: DictConfig | None = None) -> int:
    """Run ``stage`` here or on Slurm; the CLI's exit status."""
    launch = settings() if launch is None else launch
    todo = units(stage, cfg)
    if launch.launcher != Launcher.slurm or stage not in HEAVY:
        function = stage_function(stage)
        for unit in todo:
            function(unit)
        return 0
    return submit_and_wait(stage, todo, launch.slurm)


def submit_and_wait(stage: str, todo: list[DictConfig], slurm: DictConfig) -> int:
    """Submit ``todo`` as one job (or one array of jobs) and wait; report failures on stderr."""
    res = resources(stage, slurm)
    folder = Path(slurm.log_dir) if slurm.log_dir else paths.run_dir(todo[0]) / "logs" / "slurm"
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm", slurm_max_num_timeout=slurm.max_requeues)
    names = [job_name(stage, unit, slurm.job_name_prefix) for unit in todo]
    name = names[0]  # an array's elements share the name (mcts: the iteration); the shard is the array index
    executor.update_parameters(**executor_parameters(res, name, slurm))
    call = StageJob(stage, os.getcwd())
    try:
        if len(todo) == 1:
            jobs = [executor.submit(call, todo[0])]
        else:  # MCTS shards: one Slurm array, one element per shard
            jobs = executor.map_array(call, todo)
    except submitit.core.utils.FailedJobError as err:  # sbatch said no
        print(f"closedloop: {stage}: sbatch refused job {name} with resources {res}:\n{err}\nFix them under "
              f"slurm.resources.{stage} / slurm.defaults (files in ${ENV_FILES})", file=sys.stderr, flush=True)
        return 1
    ids = ", ".join(j.job_id for j in jobs)
    shape = f"array of {len(todo)}, " if len(todo) > 1 else ""
    print(f"closedloop: {stage}: submitted Slurm job {ids} ({name}, {shape}{res['tasks_per_node']} rank(s), "
          f"{res.get('gpus_per_node') or 0} GPU(s) per node); logs in {jobs[0].paths.folder}", flush=True)
    try:
        wait(jobs, slurm.poll_seconds)
    except CannotStart as err:
        for job in jobs:
            job.cancel(check=False)
        print(f"closedloop: {stage}: {err}; cancelled Slurm job {ids}. Fix its resources "
              f"(slurm.resources.{stage} / slurm.defaults in $CLOSEDLOOP_LAUNCH_CONFIG)", file=sys.stderr, flush=True)
        return 1
    except BaseException:  # SIGTERM/SIGINT from Snakemake or the user: do not leave the job running
        for job in jobs:
            job.cancel(check=False)
        print(f"closedloop: {stage}: interrupted; cancelled Slurm job {ids}", file=sys.stderr, flush=True)
        raise
    failed = 0
    for job in jobs:
        errors = [(t, t.exception()) for t in _tasks(job)]
        bad = [(t, e) for t, e in errors if e is not None]
        if bad:
            failed += 1
            job.cancel(check=False)  # a rank that failed leaves the others waiting in a collective
            print(failure_message(stage, job, *bad[0], slurm.stderr_tail_lines), file=sys.stderr, flush=True)
            continue
        print(f"closedloop: {stage}: Slurm job {job.job_id} completed; log {_tasks(job)[0].paths.stdout}", flush=True)
        _echo_tail(_tasks(job)[0].paths.stdout, 3)
    return 1 if failed else 0


def _tasks(job) -> list:
    return [job.task(i) for i in range(job.num_tasks)] if job.num_tasks > 1 else [job]


NEVER_STARTS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount",
                "InvalidQOS", "AccountNotAllowed", "QOSNotAllowed")
"""squeue reasons of a pending job that will not start without a change to the job or the cluster."""


class CannotStart(RuntimeError):
    """A submitted job is pending for a reason that waiting does not fix."""


def wait(jobs, poll_seconds: float) -> None:
    """Block until every job has finished (any final Slurm state, cancelled included); raise
    :class:`CannotStart` when one is pending for a reason in :data:`NEVER_STARTS`."""
    pending = list(jobs)
    while pending:
        pending = [j for j in pending if not j.done(force_check=True)]
        if pending:
            hopeless = _never_starting([j.job_id for j in pending])
            if hopeless:
                raise CannotStart(hopeless)
            time.sleep(poll_seconds)


def _never_starting(job_ids: list[str]) -> str | None:
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "PENDING" and parts[2] in NEVER_STARTS:
            return f"Slurm job {parts[0]} cannot start (pending, reason {parts[2]}: see `scontrol show job {parts[0]}`)"
    return None


def failure_message(stage: str, job, task, error: Exception, tail_lines: int) -> str:
    """What happened, the log paths and the tail of the failed task's stderr, for Snakemake's output."""
    state = job.watcher.get_state(job.job_id, mode="force")
    what = ("the stage raised an exception" if isinstance(error, submitit.core.utils.FailedJobError)
            else "the job ended without a result")
    where = f" in task {task.task_id}" if job.num_tasks > 1 else ""
    lines = [f"closedloop: {stage}: Slurm job {job.job_id} failed: {what}{where} (Slurm state {state}).",
             f"  stderr: {task.paths.stderr}", f"  stdout: {task.paths.stdout}"]
    tail = _tail(task.paths.stderr, tail_lines)
    lines.append(f"  last {tail_lines} lines of stderr:" if tail else "  (stderr is empty)")
    lines += ["    " + line for line in tail]
    return "\n".join(lines)


def _tail(path: Path, n: int) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _echo_tail(path: Path, n: int) -> None:
    for line in _tail(path, n):
        print(f"  | {line}", flush=True)
