"""Run a stage in this process (``local``) or as a Slurm job through submitit (``slurm``).

Longer than 400 lines because the launch settings schema, the resources and the submit-and-wait
loop of the one Slurm launcher are read together.

Every Snakemake rule calls ``closedloop run-stage``; the rule itself always runs on the
machine that runs Snakemake. With the ``slurm`` launcher the CLI submits the stage with
submitit, waits for it and fails with the job's state, log paths and stderr tail when it
fails or is cancelled. One scheduler per job: Snakemake never talks to Slurm itself. The
waiting process stays light (no torch, no stage module; the stage is imported in the job)
and shares one ``sacct`` call per poll interval with every other waiter of the run; a
killed waiter's job is re-attached by the next run of the same call (:mod:`closedloop.slurm_jobs`).
Snakemake's own ``--default-resources``/``--set-resources`` reach sbatch too (:func:`snakemake_resources`).

The launch settings are *not* part of the experiment config: they never enter a stage's
config view, so switching launcher or resources never invalidates a finished artifact.
They come from YAML files named in ``$CLOSEDLOOP_LAUNCH_CONFIG`` (``:``-separated, later
files win), which the Snakefile sets to the active profile's ``closedloop.yaml``
(``workflow/profiles/slurm/closedloop.yaml``); ``$CLOSEDLOOP_LAUNCHER`` overrides the
launcher. Schema: :class:`LaunchConfig`.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig, OmegaConf

from closedloop import config as cl_config
from closedloop import paths, slurm_jobs, stage_table

ENV_FILES = "CLOSEDLOOP_LAUNCH_CONFIG"
ENV_LAUNCHER = "CLOSEDLOOP_LAUNCHER"
ENV_SNAKEMAKE = "CLOSEDLOOP_SNAKEMAKE_RESOURCES"
SNAKEMAKE_KEYS = {"slurm_account": "account", "slurm_partition": "partition", "gpus": "gpus_per_node",
                  "mem_mb": "mem_gb", "runtime": "timeout_min", "cpus_per_task": "cpus_per_task", "nodes": "nodes",
                  "constraint": "constraint", "slurm_qos": "qos"}
"""Snakemake resource names (those of its slurm executor plugin) → :class:`SlurmResources` keys."""
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
    nodes: int | None = None
    """Nodes per job (default 1); more than 1 only for the :data:`TRAINING` stages (ranks on every node)."""
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
    gpu_mem_gb: float | None = None
    """Memory of each GPU the job gets (not an sbatch flag: choose the GPU type with ``constraint``);
    ``closedloop plan-resources`` checks the stage's estimate against it."""


def _default_resources() -> SlurmResources:
    return SlurmResources(gpus_per_node=0, nodes=1, cpus_per_task=2, mem_gb=8, timeout_min=240)


@dataclass
class SlurmConfig:
    """How heavy stages are submitted: defaults, per-stage overrides, waiting and requeueing."""

    defaults: SlurmResources = field(default_factory=_default_resources)
    resources: dict[str, SlurmResources] = field(default_factory=dict)
    """Per stage (any of :data:`HEAVY`), merged over ``defaults``."""
    snakemake_defaults: SlurmResources = field(default_factory=SlurmResources)
    """Snakemake's ``--default-resources`` (set from the Snakefile, not by hand): over ``defaults``,
    under ``resources``, as Snakemake ranks default and rule resources."""
    snakemake_resources: dict[str, SlurmResources] = field(default_factory=dict)
    """Snakemake's ``--set-resources <rule>:...``: over everything else."""
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
    """The launch settings of this process, from ``$CLOSEDLOOP_LAUNCH_CONFIG``, ``$CLOSEDLOOP_LAUNCHER``
    and the Snakemake resources the Snakefile put in ``$CLOSEDLOOP_SNAKEMAKE_RESOURCES``."""
    files = [f for f in environ.get(ENV_FILES, "").split(os.pathsep) if f]
    cfg = load_settings(files, environ.get(ENV_LAUNCHER) or None)
    if environ.get(ENV_SNAKEMAKE):
        given = json.loads(environ[ENV_SNAKEMAKE])
        cfg.slurm = cl_config.merge(cfg.slurm, {"snakemake_defaults": given["defaults"],
                                                "snakemake_resources": given["resources"]},
                                    "snakemake --default-resources/--set-resources")
    return cfg


def snakemake_resources(resource_settings) -> dict:
    """The Slurm resources given on Snakemake's command line or profile (``--default-resources``,
    ``--set-resources``) as :class:`SlurmResources` keys: ``{"defaults": {...}, "resources": {stage: {...}}}``.
    Only plain values count: Snakemake's own default ``mem_mb``/``disk_mb`` expressions (present
    whenever ``--default-resources`` is given) never override the launch settings."""

    def translate(given, where: str) -> dict:
        out = {}
        for name, resource in (given or {}).items():
            if name not in SNAKEMAKE_KEYS:
                continue
            value = _plain(resource)
            if value is None:
                continue
            if name in NUMERIC and not isinstance(value, int | float):
                raise cl_config.ConfigError(f"snakemake {where}: resource '{name}': expected a number for a Slurm "
                                            f"stage (closedloop submits it), got {value!r}")
            out[SNAKEMAKE_KEYS[name]] = value / 1024 if name == "mem_mb" else value
        return out

    if resource_settings is None:
        return {"defaults": {}, "resources": {}}
    rules = resource_settings.overwrite_resources or {}
    return {"defaults": translate(resource_settings.default_resources, "--default-resources"),
            "resources": {rule: translate(given, f"--set-resources {rule}:...")
                          for rule, given in rules.items() if rule in HEAVY}}


NUMERIC = ("gpus", "mem_mb", "runtime", "cpus_per_task", "nodes")
SNAKEMAKE_OWN_DEFAULTS = ("min(max(2*input.size_mb, 1000), 8000)", "max(2*input.size_mb, 1000) if input else 50000",
                          "system_tmpdir")
"""Expressions Snakemake adds itself whenever ``--default-resources`` is given: not the user's."""


def _plain(resource):
    """A Snakemake resource's plain value: a number, or the string of an expression such as
    ``slurm_account=lab`` (Snakemake evaluates those to the string itself); None for its own defaults."""
    if not getattr(resource, "is_evaluable", lambda: False)():
        return getattr(resource, "value", resource)
    raw = str(resource.raw)
    if raw in SNAKEMAKE_OWN_DEFAULTS:
        return None
    try:
        return ast.literal_eval(raw)  # '"lab"' or 2.5
    except (ValueError, SyntaxError):
        return raw


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


def export_for_snakemake(argv: list[str], environ=os.environ, resource_settings=None) -> DictConfig:
    """Called by the Snakefile: put the active profile's launch file in front of
    ``$CLOSEDLOOP_LAUNCH_CONFIG`` and Snakemake's own Slurm resources (``workflow.resource_settings``:
    ``--default-resources``, ``--set-resources``) in ``$CLOSEDLOOP_SNAKEMAKE_RESOURCES``, so the rules'
    CLI calls inherit both, and validate them now."""
    profile_file = profile_settings_file(argv, environ)
    files = [f for f in environ.get(ENV_FILES, "").split(os.pathsep) if f]
    if profile_file is not None and str(profile_file.resolve()) not in files:
        files.insert(0, str(profile_file.resolve()))
    environ[ENV_FILES] = os.pathsep.join(files)
    given = snakemake_resources(resource_settings)
    if given["defaults"] or given["resources"]:
        environ[ENV_SNAKEMAKE] = json.dumps(given)
    else:
        environ.pop(ENV_SNAKEMAKE, None)
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
    """One stage's sbatch resources as a plain dict, lowest layer first: ``slurm.defaults``,
    Snakemake's ``--default-resources``, ``slurm.resources.<stage>``, Snakemake's
    ``--set-resources <stage>:...``."""
    merged = OmegaConf.to_container(slurm.defaults)
    layers = (slurm.snakemake_defaults, slurm.resources.get(stage), slurm.snakemake_resources.get(stage))
    for layer in layers:
        for key, value in (OmegaConf.to_container(layer) if layer is not None else {}).items():
            if key == "extra":
                merged["extra"] = {**merged.get("extra", {}), **value}
            elif value is not None:
                merged[key] = value
    gpus = merged.get("gpus_per_node") or 0
    if merged.get("tasks_per_node") is None:
        merged["tasks_per_node"] = max(gpus, 1) if stage in TRAINING else 1
    for key in ("tasks_per_node", "nodes"):
        if (merged.get(key) or 1) > 1 and stage not in TRAINING:
            raise cl_config.ConfigError(f"key 'slurm.resources.{stage}.{key}': {stage} runs one rank "
                                        f"(expected 1, got {merged[key]}); only {list(TRAINING)} run several")
    return merged


def executor_parameters(res: dict, name: str, slurm: DictConfig) -> dict:
    """submitit ``AutoExecutor.update_parameters`` keywords for resources ``res``."""
    params = {
        "name": name,
        "nodes": res.get("nodes") or 1,
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
    if res["tasks_per_node"] * params["nodes"] > 1:
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


def master_port(job_id: str) -> int:
    """The rendezvous port that every rank of Slurm job ``job_id`` derives alike, in
    20000–32767: below Linux's ephemeral range (32768–60999), from which any outgoing
    connection on the node may hold a port at any moment. submitit's own pick spans
    20000–60000, and CI once lost a two-rank job to EADDRINUSE on its port 47436.
    A ``MASTER_PORT`` already in the job's environment wins."""
    return 20000 + zlib.crc32(job_id.encode()) % (32768 - 20000)


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
            os.environ.setdefault("MASTER_PORT", str(master_port(env.job_id)))  # read back by submitit
            dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
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


def call_dir(stage: str, todo: list[DictConfig], name: str) -> Path:
    """The work dir of one stage call on Slurm: ``<run>/.work/slurm-<job name>-<hash>/``, keyed by the
    resolved configs of its units, holding the call's lock and the record of its submitted job."""
    units_view = [OmegaConf.to_container(unit, resolve=True) for unit in todo]
    digest = cl_config.config_hash({"stage": stage, "units": units_view})[:12]
    return paths.run_dir(todo[0]) / ".work" / f"slurm-{name}-{digest}"


def submit_and_wait(stage: str, todo: list[DictConfig], slurm: DictConfig) -> int:
    """Submit ``todo`` as one job (or one array of jobs), or re-attach to the job a killed earlier
    run of the same call left queued or running, and wait; report failures on stderr.

    A second run of the same call while this one waits fails at once (the call dir's lock)."""
    res = resources(stage, slurm)
    folder = Path(slurm.log_dir) if slurm.log_dir else paths.run_dir(todo[0]) / "logs" / "slurm"
    name = job_name(stage, todo[0], slurm.job_name_prefix)  # an array's elements share the name; shard = index
    work = call_dir(stage, todo, name)
    try:
        with slurm_jobs.CallLock(work):
            return _submit_and_wait(stage, todo, slurm, res, folder, name, work)
    except slurm_jobs.CallBusy as err:
        print(f"closedloop: {stage}: another run of this stage is already running or waiting for its Slurm job: "
              f"{err}. Two writers would share its work dir; wait for that run to end, or stop it and rerun "
              f"(the rerun re-attaches to its job).", file=sys.stderr, flush=True)
        return 1


def _submit_and_wait(stage, todo, slurm, res, folder, name, work) -> int:
    poller = slurm_jobs.SharedPoller(folder, slurm.poll_seconds)
    jobs = _reattach(stage, work, poller)
    if jobs is None:
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm",
                                         slurm_max_num_timeout=slurm.max_requeues)
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
        slurm_jobs.write_record(work, {"stage": stage, "name": name, "folder": str(folder / "%j"),
                                       "jobs": [[j.job_id, j.num_tasks] for j in jobs]})
        shape = f"array of {len(todo)}, " if len(todo) > 1 else ""
        print(f"closedloop: {stage}: submitted Slurm job {_ids(jobs)} ({name}, {shape}{res['tasks_per_node']} rank(s), "
              f"{res.get('gpus_per_node') or 0} GPU(s) per node x {res.get('nodes') or 1} node(s)); "
              f"logs in {jobs[0].paths.folder}", flush=True)
    ids = [j.job_id for j in jobs]
    try:
        wait(jobs, poller, slurm.poll_seconds)
    except CannotStart as err:
        _cancel(jobs, work, poller)
        print(f"closedloop: {stage}: {err}; cancelled Slurm job {_ids(jobs)}. Fix its resources "
              f"(slurm.resources.{stage} / slurm.defaults in $CLOSEDLOOP_LAUNCH_CONFIG)", file=sys.stderr, flush=True)
        return 1
    except BaseException:  # SIGTERM/SIGINT from Snakemake or the user: do not leave the job running
        _cancel(jobs, work, poller)
        print(f"closedloop: {stage}: interrupted; cancelled Slurm job {_ids(jobs)}", file=sys.stderr, flush=True)
        raise
    poller.unregister(ids)
    failed = 0
    for job in jobs:
        outcomes = [(t, _outcome(t)) for t in _tasks(job)]
        bad = [(t, o) for t, o in outcomes if o[0] != "success"]
        if bad:
            failed += 1
            job.cancel(check=False)  # a rank that failed leaves the others waiting in a collective
            state = poller.states([job.job_id], force=True)[job.job_id].state
            print(failure_message(stage, job, *bad[0], state, slurm.stderr_tail_lines), file=sys.stderr, flush=True)
            continue
        print(f"closedloop: {stage}: Slurm job {job.job_id} completed; log {_tasks(job)[0].paths.stdout}", flush=True)
        _echo_tail(_tasks(job)[0].paths.stdout, 3)
    slurm_jobs.clear(work)
    return 1 if failed else 0


def _ids(jobs) -> str:
    return ", ".join(j.job_id for j in jobs)


def _cancel(jobs, work: Path, poller) -> None:
    for job in jobs:
        job.cancel(check=False)
    poller.unregister([j.job_id for j in jobs])
    slurm_jobs.clear(work)


def _reattach(stage: str, work: Path, poller) -> list | None:
    """The jobs recorded in ``work`` by an earlier run of this call, when one is still queued or
    running (that run was killed before it could wait them out); None: submit anew."""
    record = slurm_jobs.read_record(work)
    if not record:
        return None
    ids = [job_id for job_id, _ in record["jobs"]]
    states = poller.states(ids, force=True)
    if not any(s.active for s in states.values()):
        print(f"closedloop: {stage}: the Slurm job {', '.join(ids)} of an earlier run (pid {record.get('pid')}) "
              f"ended ({', '.join(sorted({s.state for s in states.values()}))}) while nobody waited for it; "
              f"submitting again (the stage resumes from its work dir)", flush=True)
        return None
    jobs = [submitit.SlurmJob(folder=record["folder"], job_id=job_id, tasks=tuple(range(n)))
            for job_id, n in record["jobs"]]
    print(f"closedloop: {stage}: re-attaching to Slurm job {', '.join(ids)} "
          f"({', '.join(sorted({s.state for s in states.values()}))}), submitted by an earlier run "
          f"(pid {record.get('pid')} on {record.get('host')} at {record.get('submitted')}) that stopped waiting; "
          f"logs in {jobs[0].paths.folder}", flush=True)
    return jobs


def _tasks(job) -> list:
    return [job.task(i) for i in range(job.num_tasks)] if job.num_tasks > 1 else [job]


def _outcome(task, wait_s: float = 15.0) -> tuple[str, Any]:
    """``("success", value)``, ``("error", traceback)`` or ``("none", None)`` from the task's result
    pickle (waiting up to ``wait_s`` for a slow shared filesystem to show it)."""
    deadline = time.time() + wait_s
    while not task.paths.result_pickle.exists() and time.time() < deadline:
        time.sleep(0.5)
    if not task.paths.result_pickle.exists():
        return ("none", None)
    return tuple(submitit.core.utils.pickle_load(task.paths.result_pickle))


NEVER_STARTS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount",
                "InvalidQOS", "AccountNotAllowed", "QOSNotAllowed")
"""Reasons of a pending job that will not start without a change to the job or the cluster."""


class CannotStart(RuntimeError):
    """A submitted job is pending for a reason that waiting does not fix."""


def wait(jobs, poller: slurm_jobs.SharedPoller, poll_seconds: float) -> None:
    """Block until every job has finished (all its tasks' result files written, or any final Slurm
    state, cancelled included), reading states through the run's shared ``sacct`` cache; raise
    :class:`CannotStart` when one is pending for a reason in :data:`NEVER_STARTS`."""
    pending = list(jobs)
    while pending:
        states = poller.states([j.job_id for j in pending])
        pending = [j for j in pending if states[j.job_id].active
                   and not all(t.paths.result_pickle.exists() for t in _tasks(j))]
        for job in pending:
            state = states[job.job_id]
            if state.state == "PENDING" and state.reason in NEVER_STARTS:
                raise CannotStart(f"Slurm job {job.job_id} cannot start (pending, reason {state.reason}: "
                                  f"see `scontrol show job {job.job_id}`)")
        if pending:
            time.sleep(poll_seconds)


def failure_message(stage: str, job, task, outcome: tuple, state: str, tail_lines: int) -> str:
    """What happened, the log paths and the tail of the failed task's stderr, for Snakemake's output."""
    what = "the stage raised an exception" if outcome[0] == "error" else "the job ended without a result"
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
