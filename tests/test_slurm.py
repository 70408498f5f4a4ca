"""Issues 6 and 20 on a real single-node Slurm (``scripts/slurm/up.sh``; ``scripts/test.sh`` starts it under
``CI=true`` or ``CLOSEDLOOP_START_SLURM=1``).

The smoke DAG through ``snakemake --profile slurm`` (sacct: one job per heavy stage, GPUs
where configured, outputs equal to a local run), requeue + resume from a Trainer
checkpoint, cancel, a failing job's stderr, and two DDP ranks with gloo. Skipped with the
reason when no Slurm answers, unless ``CLOSEDLOOP_REQUIRE_SLURM=1`` (CI), where that fails.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from closedloop import artifacts, launch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CI_LAUNCH = ROOT / "tests" / "slurm_launch.yaml"


def _slurm_missing() -> str | None:
    if not shutil.which("sbatch"):
        return ("no sbatch on PATH: start a local Slurm with `CLOSEDLOOP_START_SLURM=1 bash scripts/slurm/up.sh` "
                "(root and apt; it installs packages and links /etc/slurm/*.conf)")
    for cmd in (["sinfo", "-h", "-o", "%t"], ["sacct", "-n", "-X", "-S", "now"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"`{' '.join(cmd)}` did not answer ({err}): start Slurm with CLOSEDLOOP_START_SLURM=1 scripts/slurm/up.sh"
        if out.returncode != 0:
            return (f"`{' '.join(cmd)}` failed: {out.stderr.strip()[:200]} (start Slurm with "
                    "CLOSEDLOOP_START_SLURM=1 scripts/slurm/up.sh)")
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = _slurm_missing()
    if reason and os.environ.get("CLOSEDLOOP_REQUIRE_SLURM") == "1":
        pytest.fail(f"CLOSEDLOOP_REQUIRE_SLURM=1 but {reason}")
    if reason:
        pytest.skip(reason)


def env_with(launch_files: list[Path]) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["CLOSEDLOOP_LAUNCH_CONFIG"] = os.pathsep.join(map(str, launch_files))
    env.pop("CLOSEDLOOP_LAUNCHER", None)
    return env


def launch_file(tmp_path: Path, prefix: str, extra: str = "") -> Path:
    path = tmp_path / f"{prefix}.yaml"
    path.write_text(f"launcher: slurm\nslurm:\n  job_name_prefix: {prefix}\n  poll_seconds: 1\n{extra}")
    return path


def sacct_rows(since: str, prefix: str) -> list[dict]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-S", since, "-o", "JobID,JobName,State,ExitCode,AllocTRES"],
                         capture_output=True, text=True, check=True).stdout
    rows = [dict(zip(["id", "name", "state", "exit", "tres"], line.split("|"), strict=True))
            for line in out.splitlines() if line.strip()]
    return [r for r in rows if r["name"].startswith(prefix + "-")]


def job_id_by_name(name: str, timeout: float = 120, state: str = "RUNNING") -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True).stdout.split()
        if len(out) == 2 and out[1] == state:
            return out[0]
        time.sleep(0.5)
    raise AssertionError(f"no {state} Slurm job named {name} within {timeout}s")


def prepare_data(tmp_path: Path, env: dict) -> list[str]:
    """Smoke data for the synthetic task (local, ~1 s); the CLI's config arguments pointing at it."""
    args = ["--config", str(ROOT / "configs" / "smoke.yaml"), f"data_dir={tmp_path / 'data'}",
            f"results_dir={tmp_path / 'results'}"]
    local = {k: v for k, v in env.items() if k != "CLOSEDLOOP_LAUNCH_CONFIG"}
    subprocess.run([sys.executable, "-m", "closedloop", "run-stage", "data", *args, "job.task=synthetic"],
                   env=local, check=True, capture_output=True, cwd=tmp_path)
    return args


def test_smoke_dag_through_the_slurm_profile_equals_the_local_run(slurm, smoke_local_run, tmp_path):
    local_repo, local = smoke_local_run
    assert local.returncode == 0, local.stderr[-3000:]
    from conftest import copy_repo

    repo = copy_repo(tmp_path / "repo")
    since = datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    t0 = time.time()
    run = subprocess.run([sys.executable, "-m", "snakemake", "--profile", "slurm", "--cores", "8",
                          "--configfile", "configs/smoke.yaml"], cwd=repo, env=env_with([repo / CI_LAUNCH.relative_to(ROOT)]),
                         capture_output=True, text=True, timeout=1500)
    print(f"slurm smoke DAG: {time.time() - t0:.0f}s")
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "Using profile slurm" in run.stderr and "closedloop: sft: submitted Slurm job" in run.stdout + run.stderr

    deadline = time.time() + 240
    while True:  # slurmdbd may record the last job's end a moment after its result file appeared
        rows = sacct_rows(since, "cltest")
        if all(r["state"] not in ("RUNNING", "COMPLETING", "PENDING") for r in rows) or time.time() > deadline:
            break
        time.sleep(1)
    print("\n".join("|".join(r.values()) for r in rows))
    names = sorted(r["name"] for r in rows)
    evals = [f"cltest-evaluate-{m}-{t}" for m in ("base", "sft", "iter1", "iter2") for t in ("synthetic", "arc_challenge")]
    expected = sorted(["cltest-sft", "cltest-dpo-iter1", "cltest-dpo-iter2", *evals]
                      + ["cltest-mcts-iter1"] * 2 + ["cltest-mcts-iter2"] * 2)
    assert names == expected  # one job per heavy stage; data, mcts_merge, report stayed local
    for r in rows:
        assert r["state"] == "COMPLETED" and r["exit"] == "0:0", r
        wants_gpu = not r["name"].startswith("cltest-evaluate")
        assert ("gres/gpu=1" in r["tres"]) == wants_gpu, r
    for it in ("iter1", "iter2"):  # each iteration's shards: the elements of one array job
        ids = [r["id"] for r in rows if r["name"] == f"cltest-mcts-{it}"]
        assert sorted(i.split("_")[1] for i in ids) == ["0", "1"] and len({i.split("_")[0] for i in ids}) == 1, ids

    slurm_run, local_run = repo / "results" / "smoke", local_repo / "results" / "smoke"
    compared = 0
    for provenance in sorted(local_run.rglob(artifacts.PROVENANCE)):
        rel = provenance.parent.relative_to(local_run)
        if rel.parts[0] in ("coral", "vlcot", "vlm"):  # other families' tests add their targets to the shared run
            continue
        assert artifacts.content_hash(slurm_run / rel) == artifacts.content_hash(local_run / rel), rel
        compared += 1
    assert compared == 17  # sft, 8 evals, 2 x (2 shards + merged), 2 dpo
    assert (slurm_run / "report.md").read_text() == (local_run / "report.md").read_text()


def test_requeued_training_resumes_from_its_checkpoint(slurm, tmp_path):
    launch = launch_file(tmp_path, "clrequeue", "  defaults: {cpus_per_task: 2, mem_gb: 3, timeout_min: 20}\n"
                                                "  resources: {sft: {gpus_per_node: 1, cpus_per_task: 2, mem_gb: 3}}\n")
    launch.write_text(launch.read_text() + "checkpoint_steps: 2\n")
    env = env_with([launch])
    args = prepare_data(tmp_path, env)
    steps = 14
    cli = subprocess.Popen([sys.executable, "-m", "closedloop", "run-stage", "sft", *args, f"sft.max_steps={steps}",
                            "sft.logging_steps=1"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        job = job_id_by_name("clrequeue-sft")
        work = tmp_path / "results" / "smoke" / ".work"
        deadline = time.time() + 300
        while not list(work.glob("sft-*/trainer/checkpoint-*/trainer_state.json")):
            assert time.time() < deadline and cli.poll() is None, "no checkpoint was written"
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what Slurm sends before a time limit
        deadline = time.time() + 120
        while True:  # Slurm holds a requeued job (BeginTime) ~120 s: wait 3 s, then release it
            state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True).stdout
            if state.startswith("PENDING"):
                time.sleep(3)
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
                break
            assert time.time() < deadline, f"job {job} was not requeued: {state!r}"
            time.sleep(0.5)
        output, _ = cli.communicate(timeout=600)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, output[-3000:]
    log = (tmp_path / "results" / "smoke" / "logs" / "slurm" / job / f"{job}_0_log.out").read_text()
    resumed = re.search(r"sft: resuming from .*checkpoint-(\d+) \(global step (\d+)\)", log)
    assert resumed, log[-3000:]
    step = int(resumed.group(2))
    assert step >= 2 and f"sft: trained steps {step + 1}..{steps} in this run" in log  # resumed, not restarted
    out = tmp_path / "results" / "smoke" / "sft"
    logged = [int(line.split(",")[0]) for line in (out / "train_log.csv").read_text().splitlines()[1:]]
    assert logged == list(range(1, steps + 1))
    assert (out / "model" / "model.safetensors").is_file()
    assert not list(out.parent.glob(".sft.tmp-*")) and not list(out.parent.glob(".work/sft-*"))
    deadline = time.time() + 240
    while True:  # the CLI sees the result file before slurmdbd has recorded the job's end
        states = subprocess.run(["sacct", "-j", job, "-X", "-n", "-D", "-o", "State"], capture_output=True,
                                text=True).stdout.split()
        if states[-1:] == ["COMPLETED"] or time.time() > deadline:
            break
        time.sleep(1)
    assert "REQUEUED" in states and states[-1] == "COMPLETED", states


def test_cancelled_stage_fails_the_rule_quickly(slurm, repo_copy):
    launch = launch_file(repo_copy, "clcancel", "  defaults: {cpus_per_task: 1, mem_gb: 2, timeout_min: 20}\n"
                                                "  resources: {sft: {gpus_per_node: 1, cpus_per_task: 1, mem_gb: 2}}\n")
    env = env_with([launch])
    subprocess.run([sys.executable, "-m", "snakemake", "data/smoke/synthetic", "--cores", "2", "--configfile",
                    "configs/smoke.yaml"], cwd=repo_copy, env=env, check=True, capture_output=True, timeout=300)
    sm = subprocess.Popen([sys.executable, "-m", "snakemake", "results/smoke/sft", "--profile", "slurm", "--cores", "2",
                           "--configfile", "configs/smoke.yaml"], cwd=repo_copy, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        job = job_id_by_name("clcancel-sft")
        time.sleep(2)
        subprocess.run(["scancel", job], check=True)
        t0 = time.time()
        output, _ = sm.communicate(timeout=120)
        elapsed = time.time() - t0
    finally:
        if sm.poll() is None:
            sm.kill()
    assert sm.returncode != 0 and elapsed < 60, (elapsed, output[-3000:])
    assert f"Slurm job {job} failed: the job ended without a result (Slurm state CANCELLED" in output, output[-3000:]
    assert f"stderr: {repo_copy}/results/smoke/logs/slurm/{job}/{job}_0_log.err" in output
    assert "Error in rule sft" in output
    assert not (repo_copy / "results" / "smoke" / "sft").exists()


def test_failed_job_shows_its_stderr_tail(slurm, tmp_path):
    env = env_with([launch_file(tmp_path, "clfail", "  defaults: {cpus_per_task: 1, mem_gb: 2, timeout_min: 5}\n"
                                                    "  resources: {sft: {cpus_per_task: 1, mem_gb: 2}}\n")])
    args = prepare_data(tmp_path, env)
    out = subprocess.run([sys.executable, "-m", "closedloop", "run-stage", "sft", *args, "sft.task=arc_challenge"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert re.search(r"Slurm job \d+ failed: the stage raised an exception \(Slurm state", out.stderr), out.stderr
    assert "last 40 lines of stderr:" in out.stderr and "arc_challenge/train.jsonl" in out.stderr, out.stderr[-2000:]


def test_two_ranks_train_with_gloo_ddp(slurm, tmp_path):
    env = env_with([launch_file(tmp_path, "clddp", "  defaults: {cpus_per_task: 1, mem_gb: 2, timeout_min: 20}\n"
                                                   "  resources: {sft: {tasks_per_node: 2, gpus_per_node: 0, cpus_per_task: 1, mem_gb: 2}}\n")])
    args = prepare_data(tmp_path, env)
    out = subprocess.run([sys.executable, "-m", "closedloop", "run-stage", "sft", *args], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    job = re.search(r"submitted Slurm job (\d+) \(clddp-sft, 2 rank\(s\)", out.stdout).group(1)
    folder = tmp_path / "results" / "smoke" / "logs" / "slurm" / job
    for rank in (0, 1):
        log = (folder / f"{job}_{rank}_log.out").read_text()
        assert f"sft: rank {rank} of world size 2 (distributed, gloo)" in log, log[-2000:]
        assert re.search(rf"rank {rank}/2 \(local {rank}\) master \S+:{launch.master_port(job)}\n", log), log[-2000:]
    sft = tmp_path / "results" / "smoke" / "sft"
    assert (sft / "model" / "model.safetensors").is_file()
    assert [p.name for p in sft.parent.iterdir() if p.name.startswith(".sft")] == []


def test_jobs_that_cannot_run_fail_at_once(slurm, tmp_path):
    """sbatch refusing the job, or Slurm accepting one it will never start: a clear error, no wait."""
    cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])
    for prefix, resources, expected in (
        ("clrefused", "{cpus_per_task: 1, mem_gb: 4096}", "sbatch refused job clrefused-sft"),
        ("clnever", f"{{cpus_per_task: {cpus + 1}, mem_gb: 1}}", "cannot start (pending, reason PartitionConfig"),
    ):
        env = env_with([launch_file(tmp_path, prefix, f"  defaults: {resources}\n")])
        t0 = time.time()
        out = subprocess.run([sys.executable, "-m", "closedloop", "run-stage", "sft", "--config",
                              str(ROOT / "configs" / "smoke.yaml"), f"results_dir={tmp_path / 'results'}"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and expected in out.stderr, out.stderr[-2000:]
        assert "slurm.resources.sft / slurm.defaults" in out.stderr and time.time() - t0 < 60
    assert not subprocess.run(["squeue", "-h", "-n", "clnever-sft"], capture_output=True, text=True).stdout.strip()


WAITER = ("import re, sys; from closedloop import cli; rc = cli.main(sys.argv[1:]); "
          "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'closedloop.stages.sft') if m in sys.modules); "
          "hwm = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)); "
          "print(f'waiter: heavy modules {heavy} peak rss {hwm // 1024} MB', flush=True); sys.exit(rc)")
"""``closedloop run-stage`` that reports, when it ends, which heavy modules it imported and its peak RSS
(VmHWM of its own address space: ``getrusage``'s ``ru_maxrss`` carries the parent's peak across
fork + exec on Linux, so under pytest it reported the test process's 1.6 GB, not the waiter's)."""


def test_killed_waiter_is_reattached_and_a_second_writer_fails(slurm, tmp_path):
    """SIGKILL the waiting CLI mid-job: its record stays in the call's work dir; the rerun re-attaches
    to the running job (one Slurm job, artifact written once); a run beside it fails at once, naming
    the holder. The waiter never imports torch or the stage and stays under 150 MB."""
    launch = launch_file(tmp_path, "clattach", "  defaults: {cpus_per_task: 1, mem_gb: 2, timeout_min: 20}\n"
                                               "  resources: {sft: {gpus_per_node: 0, cpus_per_task: 1, mem_gb: 2}}\n")
    env = env_with([launch])
    args = prepare_data(tmp_path, env)
    since = datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    cmd = [sys.executable, "-c", WAITER, "run-stage", "sft", *args, "sft.max_steps=12"]
    first = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job = job_id_by_name("clattach-sft")
    first.kill()  # SIGKILL: no handler runs, the job stays
    first.communicate(timeout=30)
    records = list((tmp_path / "results" / "smoke" / ".work").glob("slurm-clattach-sft-*/slurm_job.json"))
    assert len(records) == 1 and f'"{job}"' in records[0].read_text()

    second = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while f"pid {second.pid} " not in (records[0].parent / "lock").read_text():
            assert time.time() < deadline and second.poll() is None, "the rerun did not take the lock"
            time.sleep(0.2)
        t0 = time.time()
        third = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert third.returncode == 1 and time.time() - t0 < 30, third.stderr[-2000:]
        assert "another run of this stage is already running or waiting for its Slurm job" in third.stderr
        assert f"lock is held by pid {second.pid} on " in third.stderr, third.stderr[-2000:]
        output, _ = second.communicate(timeout=600)
    finally:
        if second.poll() is None:
            second.kill()
    assert second.returncode == 0, output[-3000:]
    # RUNNING, or PENDING while slurmdbd has not yet recorded the start that squeue showed
    assert re.search(rf"closedloop: sft: re-attaching to Slurm job {job} \((RUNNING|PENDING)\)", output), output[-3000:]
    assert "submitted Slurm job" not in output and f"Slurm job {job} completed" in output
    light = re.search(r"waiter: heavy modules \[\] peak rss (\d+) MB", output)
    assert light and int(light.group(1)) <= 150, output[-1000:]
    assert [r["id"] for r in sacct_rows(since, "clattach")] == [job]  # one Slurm job in all
    sft = tmp_path / "results" / "smoke" / "sft"
    logged = [int(line.split(",")[0]) for line in (sft / "train_log.csv").read_text().splitlines()[1:]]
    assert logged == list(range(1, 13)) and (sft / "model" / "model.safetensors").is_file()
    assert not records[0].parent.exists()  # record and lock cleared once the job's end was reported


def test_snakemake_resource_flags_reach_sbatch(slurm, repo_copy):
    """--default-resources / --set-resources go over closedloop.yaml: read back from `scontrol show job`."""
    launch = launch_file(repo_copy, "clflags", "  defaults: {cpus_per_task: 1, mem_gb: 2, timeout_min: 20, "
                                               "account: nosuchaccount, partition: nosuchpartition}\n"
                                               "  resources: {sft: {gpus_per_node: 0, cpus_per_task: 1, mem_gb: 2}}\n")
    env = env_with([launch])
    subprocess.run([sys.executable, "-m", "snakemake", "data/smoke/synthetic", "--cores", "2", "--configfile",
                    "configs/smoke.yaml"], cwd=repo_copy, env=env, check=True, capture_output=True, timeout=300)
    sm = subprocess.Popen([sys.executable, "-m", "snakemake", "results/smoke/sft", "--profile", "slurm", "--cores", "2",
                           "--configfile", "configs/smoke.yaml", "--default-resources", "slurm_account=ci",
                           "slurm_partition=debug", "--set-resources", "sft:gpus=2", "sft:mem_mb=1536",
                           "sft:cpus_per_task=1", "sft:runtime=17"], cwd=repo_copy, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, job = time.time() + 120, ""
        while not job:  # pending or running: either way sbatch has taken the resources
            assert time.time() < deadline and sm.poll() is None, "no Slurm job clflags-sft"
            time.sleep(0.5)
            job = subprocess.run(["squeue", "-h", "-n", "clflags-sft", "-o", "%i"], capture_output=True,
                                 text=True).stdout.strip()
        show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
        subprocess.run(["scancel", job], check=True)
        output, _ = sm.communicate(timeout=120)
    finally:
        if sm.poll() is None:
            sm.kill()
    fields = dict(f.split("=", 1) for f in show.split() if "=" in f)
    assert (fields["Account"], fields["Partition"], fields["TimeLimit"]) == ("ci", "debug", "00:17:00"), show
    assert fields["NumCPUs"] == "2" and fields["CPUs/Task"] == "1", show  # 2 ranks (one per GPU) x 1 CPU
    assert "gres/gpu=2" in fields["TRES"] and fields["MinMemoryNode"] == "1.50G", show
    assert f"Slurm job {job} failed" in output, output[-2000:]


def test_waiters_of_one_run_share_one_sacct_call_per_interval(slurm, tmp_path):
    """Six pollers asking within one interval cost one sacct call (counted by a wrapper around the
    real sacct); a forced refresh sees a cancelled job at once."""
    from closedloop import slurm_jobs

    (tmp_path / "bin").mkdir()
    calls = tmp_path / "calls"
    (tmp_path / "bin" / "sacct").write_text(f"#!/bin/sh\necho x >> {calls}\nexec {shutil.which('sacct')} \"$@\"\n")
    (tmp_path / "bin" / "sacct").chmod(0o755)
    ids = [subprocess.run(["sbatch", "--parsable", "--hold", "-J", "clpoll", "-o", "/dev/null", "--wrap", "true"],
                          capture_output=True, text=True, check=True).stdout.strip() for _ in range(3)]
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{old_path}"
    try:
        poller = slurm_jobs.SharedPoller(tmp_path / "logs", max_age_s=10)
        # slurmdbd lags sbatch, by minutes on a loaded CI machine (a 60 s wait here failed CI once); the
        # pending reason is the controller's to update, so only the state is compared below
        deadline = time.time() + 240
        while True:
            states = poller.states(ids, force=True)
            if all(s.state == "PENDING" for s in states.values()):
                break
            assert time.time() < deadline, f"sacct did not show the held jobs {ids} as PENDING in 240 s: {states}"
            time.sleep(1)
        time.sleep(10.1)  # the cache is stale now
        calls.write_text("")
        seen = [slurm_jobs.SharedPoller(tmp_path / "logs", max_age_s=10).states(ids) for _ in range(6)]
        assert calls.read_text().count("x") == 1
        assert all(s[i].state == "PENDING" for s in seen for i in ids), seen
        subprocess.run(["scancel", *ids], check=True)
        deadline = time.time() + 240
        while (state := slurm_jobs.SharedPoller(tmp_path / "logs", max_age_s=10).states(ids, force=True)[ids[0]]).active:
            assert time.time() < deadline, f"sacct still shows cancelled job {ids[0]} as {state} after 240 s"
            time.sleep(1)
    finally:
        os.environ["PATH"] = old_path
        subprocess.run(["scancel", *ids], check=False)
