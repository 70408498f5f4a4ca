"""Every training stage resumes after a kill (a requeue, a preemption) from its work dir, like
``sft`` and ``dpo`` do (tests/test_slurm.py): here ``vlm_sft`` (the vision phase is reused, the
SFT trainer resumes from its checkpoint) and ``vdpo`` (a finished γ is reused, the running one
resumes), each killed with SIGKILL mid-training on the vlm_smoke config and run again."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from closedloop import checkpoints, config, paths
from closedloop.stages import vdpo_pairs, vlm_data, vlm_sft

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _setup(tmp_path, *overrides):
    (tmp_path / "launch.yaml").write_text("checkpoint_steps: 1\n")
    args = ["--config", str(ROOT / "configs" / "vlm_smoke.yaml"), f"data_dir={tmp_path / 'data'}",
            f"results_dir={tmp_path / 'results'}", *overrides]
    env = {**os.environ, "CLOSEDLOOP_LAUNCH_CONFIG": str(tmp_path / "launch.yaml"), "CLOSEDLOOP_LAUNCHER": "local"}
    return config.load(args[1:2], list(args[2:])), args, env


def _kill_when(cmd, env, ready, timeout=300):
    """Start ``cmd``, SIGKILL its process group once ``ready()`` holds; fail if it finished first."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the stage finished before it could be killed"
        assert time.time() < deadline, "the stage never reached the kill point"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _run(cmd, env) -> str:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _steps(log: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in log.read_text().splitlines()[1:]]


def test_vlm_sft_resumes_after_a_kill(tmp_path):
    steps = 24
    cfg, args, env = _setup(tmp_path, f"vlm.sft.max_steps={steps}")
    vlm_data.main(cfg)
    cmd = [sys.executable, "-m", "closedloop", "run-stage", "vlm_sft", *args]
    work = paths.vlm_sft_dir(cfg).parent / ".work"
    # killed once a checkpoint is complete (its state parses: the kill may land while the state is written)
    _kill_when(cmd, env, lambda: any(checkpoints.is_complete(c) for c in work.glob("sft-*/trainer/checkpoint-*")))
    out = paths.vlm_sft_dir(cfg)
    assert not out.exists()  # nothing marked done
    log = _run(cmd, env)
    assert "vlm_sft: vision phase finished before the requeue, reused" in log
    assert "vlm_sft: resuming from" in log, log[-2000:]
    assert _steps(out / "train_log.csv") == list(range(1, steps + 1))  # each step logged once
    assert {p.name for p in out.iterdir()} >= {"model", "train_log.csv", "vision_log.csv", "heads.safetensors"}
    assert not list(work.glob("sft-*"))  # the work dir is removed once the artifact is in place


def test_vdpo_reuses_a_finished_gamma_and_resumes_the_next(tmp_path):
    steps = 12
    cfg, args, env = _setup(tmp_path, f"vlm.vdpo.max_steps={steps}", "vlm.sft.max_steps=2", "vlm.pairs.alpha=none")
    vlm_data.main(cfg)
    vlm_sft.main(cfg)
    vdpo_pairs.main(cfg)
    cmd = [sys.executable, "-m", "closedloop", "run-stage", "vdpo", *args, "job.variant=vdpo"]
    work = paths.vdpo_dir(cfg, "vdpo").parent / ".work"
    grid = [f"{g:g}" for g in cfg.vlm.vdpo.gamma_grid]

    def second_gamma_checkpointed():
        first = list(work.glob(f"vdpo-*/gamma-{grid[0]}/entry.json"))
        return first and any(checkpoints.is_complete(c) for c in work.glob(f"vdpo-*/gamma-{grid[1]}/trainer/checkpoint-*"))

    _kill_when(cmd, env, second_gamma_checkpointed)
    out = paths.vdpo_dir(cfg, "vdpo")
    assert not out.exists()
    log = _run(cmd, env)
    assert f"vdpo: γ = {grid[0]}: finished before the requeue, reused" in log
    assert "vdpo: resuming from" in log, log[-2000:]
    for g in grid:
        assert _steps(out / "gamma" / g / "train_log.csv") == list(range(1, steps + 1))
    assert (out / "gamma_selection.json").is_file() and (out / "model" / "model.safetensors").is_file()
