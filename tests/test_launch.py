"""Launch settings (local or Slurm through submitit): resources, names, profile lookup, errors.
No cluster needed; tests/test_slurm.py runs the same code against a real Slurm."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from closedloop import config, launch, stage_table

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "workflow" / "profiles" / "slurm"


def settings(tmp_path, text: str):
    path = tmp_path / "launch.yaml"
    path.write_text(text)
    return launch.load_settings([path])


def test_profile_settings_load_and_default_to_one_rank_per_gpu_for_training():
    s = launch.load_settings([PROFILE / "closedloop.yaml"])
    assert s.launcher == launch.Launcher.slurm and s.checkpoint_steps > 0
    sft = launch.resources("sft", s.slurm)
    assert sft["gpus_per_node"] == 1 and sft["tasks_per_node"] == 1 and sft["cpus_per_task"] == 8
    assert launch.resources("report", s.slurm)["gpus_per_node"] == 0  # not a Slurm stage: defaults only


def test_stage_resources_merge_over_defaults_and_map_to_submitit(tmp_path):
    s = settings(tmp_path, """
launcher: slurm
slurm:
  defaults: {account: lab, partition: gpu, constraint: a100, extra: {reservation: r1}}
  resources:
    dpo: {gpus_per_node: 4, mem_gb: 100, partition: big, extra: {exclusive: true}}
    evaluate: {gpus_per_node: 2}
""")
    dpo = launch.resources("dpo", s.slurm)
    assert dpo["tasks_per_node"] == 4 and dpo["partition"] == "big" and dpo["mem_gb"] == 100
    params = launch.executor_parameters(dpo, "cl-dpo-iter1", s.slurm)
    assert params["slurm_account"] == "lab" and params["slurm_partition"] == "big"
    assert params["slurm_constraint"] == "a100" and params["gpus_per_node"] == 4 and params["tasks_per_node"] == 4
    assert params["slurm_additional_parameters"] == {"reservation": "r1", "exclusive": True}
    assert params["slurm_srun_args"] == ["--kill-on-bad-exit=1"] and params["name"] == "cl-dpo-iter1"
    assert launch.resources("evaluate", s.slurm)["tasks_per_node"] == 1  # one process sees both GPUs


def test_settings_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(config.ConfigError, match=r"launch.yaml: key 'slurm.defaults.mem_gb'.*converted to Float"):
        settings(tmp_path, "slurm: {defaults: {mem_gb: lots}}")
    with pytest.raises(config.ConfigError, match=r"key 'slurm.resources.report': not a stage that runs on Slurm"):
        settings(tmp_path, "slurm: {resources: {report: {gpus_per_node: 1}}}")
    with pytest.raises(config.ConfigError, match=r"launch.yaml: key 'launcher'"):
        settings(tmp_path, "launcher: pbs")
    s = settings(tmp_path, "slurm: {resources: {mcts: {tasks_per_node: 2}}}")
    with pytest.raises(config.ConfigError, match=r"'slurm.resources.mcts.tasks_per_node': mcts runs one rank"):
        launch.resources("mcts", s.slurm)


def test_environment_selects_files_in_order_and_the_launcher(tmp_path):
    lab = tmp_path / "lab.yaml"
    lab.write_text("slurm: {defaults: {account: mylab}}\n")
    env = {launch.ENV_FILES: f"{PROFILE / 'closedloop.yaml'}{os.pathsep}{lab}"}
    s = launch.settings(env)
    assert s.launcher == "slurm" and s.slurm.defaults.account == "mylab" and s.slurm.resources.sft.gpus_per_node == 1
    assert launch.settings({**env, launch.ENV_LAUNCHER: "local"}).launcher == "local"
    assert launch.settings({}).launcher == "local"


def test_snakemake_profile_is_found_the_way_snakemake_finds_it(monkeypatch):
    monkeypatch.chdir(ROOT)
    found = launch.profile_settings_file(["snakemake", "--profile", "slurm", "--cores", "2"], {})
    assert found is not None and found.resolve() == (PROFILE / "closedloop.yaml").resolve()
    found = launch.profile_settings_file(["snakemake", "--profile=workflow/profiles/slurm"], {})
    assert found is not None and found.resolve() == (PROFILE / "closedloop.yaml").resolve()
    assert launch.profile_settings_file(["snakemake", "--cores", "2"], {}) is None
    env = {}
    s = launch.export_for_snakemake(["snakemake", "--profile", "slurm"], env)
    assert s.launcher == "slurm" and env[launch.ENV_FILES] == str((PROFILE / "closedloop.yaml").resolve())


def test_mcts_call_without_a_shard_is_one_unit_per_shard_and_names_are_stable(smoke_cfg):
    smoke_cfg.job.iteration = 2
    units = launch.units("mcts", smoke_cfg)
    assert [u.job.shard for u in units] == list(range(smoke_cfg.mcts.n_shards)) and smoke_cfg.job.shard is None
    assert launch.job_name("mcts", units[0], "cl") == "cl-mcts-iter2"
    smoke_cfg.job.variant = "plain_dpo"
    assert launch.job_name("dpo", smoke_cfg, "cl") == "cl-dpo-ablations-plain_dpo-iter2"
    smoke_cfg.job.model, smoke_cfg.job.task = "iter1", "synthetic"
    assert launch.job_name("evaluate", smoke_cfg, "cl") == "cl-evaluate-iter1-synthetic"


def test_launch_settings_are_not_in_any_stage_view(smoke_cfg):
    for stage in stage_table.STAGES:
        view = config.stage_view(smoke_cfg, stage)
        assert not {"launcher", "slurm", "checkpoint_steps"} & set(view)
    assert "launcher" not in OmegaConf.to_container(smoke_cfg)


@pytest.mark.slow
def test_switching_to_the_slurm_profile_reruns_nothing(smoke_local_run):
    """The launcher is not a param: after a local run, `--profile slurm` has nothing to do (dry run)."""
    repo, first = smoke_local_run
    assert first.returncode == 0, first.stderr[-3000:]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "snakemake", "--profile", "slurm", "-n", "--configfile",
                          "configs/smoke.yaml"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Using profile slurm" in out.stderr and "Nothing to be done" in out.stdout + out.stderr


def test_snakemake_resource_flags_layer_over_the_launch_settings(tmp_path):
    """--default-resources sits over slurm.defaults and under slurm.resources.<stage>; --set-resources
    over everything (Snakemake's own ranking); Snakemake's built-in mem/disk expressions never count."""
    from snakemake.cli import parse_set_resources
    from snakemake.resources import Resources
    from snakemake.settings.types import ResourceSettings

    given = ResourceSettings(
        default_resources=Resources.parse(["slurm_account=lab", "slurm_partition='gpu'", "runtime=2h", "gpus=0"],
                                          allow_expressions=True, defaults="full"),
        overwrite_resources=parse_set_resources(["sft:gpus=4", "sft:mem_mb=3072", "sft:cpus_per_task=3",
                                                 "dpo:nodes=2", "report:mem_mb=1"]))
    assert launch.snakemake_resources(given) == {
        "defaults": {"account": "lab", "partition": "gpu", "timeout_min": 120, "gpus_per_node": 0},
        "resources": {"sft": {"gpus_per_node": 4, "mem_gb": 3.0, "cpus_per_task": 3}, "dpo": {"nodes": 2}}}
    env = {launch.ENV_FILES: str(PROFILE / "closedloop.yaml")}
    s = launch.export_for_snakemake(["snakemake"], env, resource_settings=given)
    sft, dpo, evaluate = (launch.resources(stage, s.slurm) for stage in ("sft", "dpo", "evaluate"))
    assert (sft["account"], sft["partition"], sft["gpus_per_node"], sft["tasks_per_node"]) == ("lab", "gpu", 4, 4)
    assert (sft["mem_gb"], sft["cpus_per_task"], sft["timeout_min"]) == (3.0, 3, 720)  # the profile's sft timeout wins
    assert dpo["gpus_per_node"] == 1 and dpo["nodes"] == 2 and dpo["mem_gb"] == 64  # profile's dpo over defaults
    assert evaluate["gpus_per_node"] == 1 and evaluate["timeout_min"] == 120  # 2h over the profile's default 240
    params = launch.executor_parameters(dpo, "cl-dpo-iter1", s.slurm)
    assert params["nodes"] == 2 and params["slurm_srun_args"] == ["--kill-on-bad-exit=1"]
    assert launch.export_for_snakemake(["snakemake"], env) and launch.ENV_SNAKEMAKE not in env
    with pytest.raises(config.ConfigError, match=r"--set-resources sft:...: resource 'gpus': expected a number"):
        launch.snakemake_resources(ResourceSettings(overwrite_resources=parse_set_resources(["sft:gpus=2*input.size_mb"])))
    s = settings(tmp_path, "slurm: {resources: {evaluate: {nodes: 2}}}")
    with pytest.raises(config.ConfigError, match=r"'slurm.resources.evaluate.nodes': evaluate runs one rank"):
        launch.resources("evaluate", s.slurm)


def test_ranks_meet_on_a_port_below_the_ephemeral_range_derived_from_the_job_id():
    ports = [launch.master_port(str(job)) for job in range(1, 2001)] + [launch.master_port("4242_7")]
    assert all(20000 <= port <= 32767 for port in ports)
    assert launch.master_port("19") == launch.master_port("19") != launch.master_port("20")
    assert len(set(ports)) > 1800  # spread, so that two jobs on one node rarely share a port


def test_sacct_rows_are_read_by_job_and_array_element():
    from closedloop import slurm_jobs

    text = "12|RUNNING|None\n13_[0-2,5%2]|PENDING|JobHeldUser\n13_3|CANCELLED by 0|None\n14_1|COMPLETED|None\n\n"
    states = slurm_jobs.parse_sacct(text)
    assert sorted(states) == ["12", "13_0", "13_1", "13_2", "13_3", "13_5", "14_1"]
    assert states["13_5"] == slurm_jobs.JobState("PENDING", "JobHeldUser") and states["13_5"].active
    assert states["13_3"].state == "CANCELLED" and not states["13_3"].active and states["12"].active


def test_a_second_holder_of_a_stage_call_lock_is_refused_with_the_holder(tmp_path):
    from closedloop import slurm_jobs

    with slurm_jobs.CallLock(tmp_path / "call"):
        slurm_jobs.write_record(tmp_path / "call", {"jobs": [["7", 2]]})
        code = ("import sys; from closedloop import slurm_jobs\n"
                "try:\n    slurm_jobs.CallLock(sys.argv[1]).__enter__()\nexcept slurm_jobs.CallBusy as e:\n    print(e)")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "call")], capture_output=True, text=True)
        assert f"call/lock is held by pid {os.getpid()} on " in out.stdout, out.stderr
        assert slurm_jobs.read_record(tmp_path / "call")["jobs"] == [["7", 2]]
        slurm_jobs.clear(tmp_path / "call")
    assert not (tmp_path / "call").exists()
    with slurm_jobs.CallLock(tmp_path / "call"):  # free again once released
        pass


def test_local_slurm_starts_only_when_asked_and_never_over_a_foreign_config(tmp_path):
    """scripts/slurm/up.sh changes the machine: without CI=true or CLOSEDLOOP_START_SLURM=1 it does
    nothing; with it, a slurm.conf that is not its own link is refused and left as it was."""
    up = ROOT / "scripts" / "slurm" / "up.sh"
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "CLOSEDLOOP_START_SLURM")}
    env.update(SLURM_CI_DIR=str(tmp_path / "ci"), SLURM_ETC=str(tmp_path / "etc"))
    out = subprocess.run(["bash", str(up)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 3 and "Set CLOSEDLOOP_START_SLURM=1 (or CI=true" in out.stderr, out.stderr
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "slurm.conf").write_text("ClusterName=lab\n")
    (tmp_path / "etc" / "gres.conf").symlink_to(tmp_path / "elsewhere.conf")
    for opt_in in ({"CLOSEDLOOP_START_SLURM": "1"}, {"CI": "true"}):
        out = subprocess.run(["bash", str(up)], env={**env, **opt_in}, capture_output=True, text=True, timeout=30)
        assert out.returncode == 3, out.stdout + out.stderr
        assert f"refusing to touch {tmp_path}/etc/slurm.conf: it is not this script's link" in out.stderr
        assert "a regular file). This machine has its own Slurm config: left alone." in out.stderr
    (tmp_path / "etc" / "slurm.conf").unlink()
    out = subprocess.run(["bash", str(up)], env={**env, "CI": "true"}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 3 and f"it is a link to {tmp_path}/elsewhere.conf)" in out.stderr, out.stderr
    assert not (tmp_path / "ci").exists() and os.readlink(tmp_path / "etc" / "gres.conf") == str(tmp_path / "elsewhere.conf")
