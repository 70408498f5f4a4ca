"""The whole DAG on the smoke config, with real Snakemake, git and DVC, in a temp repo."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([*SNAKEMAKE, "--cores", "2", "--configfile", "configs/smoke.yaml", *args],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)


def planned_jobs(output: str) -> dict[str, int]:
    table = re.search(r"job\s+count\n[-\s]+\n(.*?)\ntotal", output, re.S)
    return {m[0]: int(m[1]) for m in re.findall(r"(\w+)\s+(\d+)", table.group(1))} if table else {}


def test_smoke_dag_runs_end_to_end_then_has_nothing_to_do(repo_copy):
    first = snakemake(repo_copy)
    assert first.returncode == 0, first.stderr[-3000:]
    run = repo_copy / "results" / "smoke"
    for rel in ["report.md", "report.provenance.json", "report.config.yaml", "plots/accuracy.png",
                "plots/sft_loss.png", "sft/model/model.safetensors", "sft/train_log.csv",
                "eval/base/synthetic/metrics.json", "eval/sft/arc_challenge/metrics.json",
                "iter1/mcts/merged/pairs.jsonl", "iter1/mcts/shards/1/trees.jsonl"]:
        assert (run / rel).is_file(), rel
    for png in ("accuracy.png", "sft_loss.png"):
        assert (run / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    report = (run / "report.md").read_text()
    assert "| synthetic | 12 |" in report and "| arc_challenge | 12 |" in report
    assert "## MCTS data engine" in report and "4 trees" in report
    assert (repo_copy / "data.dvc").is_file() and "outs:" in (repo_copy / "data.dvc").read_text()

    second = snakemake(repo_copy)
    assert second.returncode == 0 and "Nothing to be done" in second.stdout + second.stderr

    # one changed setting reruns only what it invalidates: SFT, what it feeds (evals of the SFT model,
    # MCTS with the SFT policy) and the report; never the data or the base-model evals
    changed = snakemake(repo_copy, "-n", "--config", "sft={learning_rate: 0.001}")
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert planned_jobs(changed.stdout) == {"sft": 1, "evaluate": 2, "mcts": 2, "mcts_merge": 1, "report": 1,
                                            "all": 1}
    assert "output: results/smoke/eval/base" not in changed.stdout

    html = snakemake(repo_copy, "--report", "report.html")
    assert html.returncode == 0, html.stderr[-2000:]
    assert (repo_copy / "report.html").stat().st_size > 10_000


def test_lint_is_clean(repo_copy):
    for extra in ([], ["--configfile", "configs/smoke.yaml"]):
        out = subprocess.run([*SNAKEMAKE, "--lint", *extra], cwd=repo_copy, capture_output=True, text=True)
        assert out.returncode == 0 and "Lints for" not in out.stdout + out.stderr, out.stdout + out.stderr


def test_bad_snakemake_config_names_the_key(repo_copy):
    out = snakemake(repo_copy, "-n", "--config", "sft={lr: 0.1}")
    assert out.returncode != 0
    assert "sft.lr" in out.stdout + out.stderr
