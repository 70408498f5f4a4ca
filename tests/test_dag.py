"""The whole DAG on the smoke config, with real Snakemake, git and DVC, in a temp repo."""

import json
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
                          cwd=repo, env=env, capture_output=True, text=True, timeout=1500)


def planned_jobs(output: str) -> dict[str, int]:
    table = re.search(r"job\s+count\n[-\s]+\n(.*?)\ntotal", output, re.S)
    return {m[0]: int(m[1]) for m in re.findall(r"(\w+)\s+(\d+)", table.group(1))} if table else {}


def test_smoke_dag_runs_end_to_end_then_has_nothing_to_do(smoke_local_run):
    repo_copy, first = smoke_local_run  # the first run (shared with tests/test_slurm.py)
    assert first.returncode == 0, first.stderr[-3000:]
    run = repo_copy / "results" / "smoke"
    for rel in ["report.md", "report.provenance.json", "report.config.yaml", "plots/accuracy.png",
                "sft/model/model.safetensors", "sft/train_log.csv",
                "eval/base/synthetic/metrics.json", "eval/sft/arc_challenge/metrics.json",
                "iter1/mcts/merged/pairs.jsonl", "iter1/mcts/shards/1/trees.jsonl",
                "iter2/dpo/model/model.safetensors", "iter2/dpo/train_log.csv",
                "eval/iter2/synthetic/metrics.json", "plots/iterations.png", "plots/training_loss.png"]:
        assert (run / rel).is_file(), rel
    for png in ("accuracy.png", "iterations.png", "training_loss.png"):
        assert (run / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    # the report is recorded in DVC and its lineage reaches every stage (more in test_lineage.py)
    assert (run / "report.md.dvc").is_file() and (run / "plots.dvc").is_file()
    lineage = subprocess.run([sys.executable, "-m", "closedloop", "lineage", "results/smoke/report.md", "--json"],
                             cwd=repo_copy, capture_output=True, text=True)
    assert lineage.returncode == 0, lineage.stderr
    assert {a["stage"] for a in json.loads(lineage.stdout)["artifacts"].values()} == {
        "report", "evaluate", "dpo", "mcts_merge", "mcts", "sft", "data"}
    report = (run / "report.md").read_text()
    assert "n per task: 12 / 12" in report and "| iter2 | " in report
    assert "## MCTS data" in report and "| iter2 |" in report and "| synthetic | closedloop |" in report
    assert re.search(r"## Against SFT, question by question.*\| synthetic \| closedloop \| \+\d+ / −\d+, p [01]\.\d\d \|", report, re.S)

    # iteration 2's DPO config changed: exactly the iteration-2 jobs are planned again
    iter2 = snakemake(repo_copy, "-n", "--config", "dpo={per_iteration: {2: {beta: 0.2}}}")
    assert iter2.returncode == 0, iter2.stderr[-2000:]
    assert planned_jobs(iter2.stdout) == {"dpo": 1, "evaluate": 2, "report": 1, "dvc_views": 1, "all": 1}
    assert "output: results/smoke/iter2/dpo" in iter2.stdout and "results/smoke/iter1/dpo\n" not in iter2.stdout
    assert (repo_copy / "data/smoke.dvc").is_file() and "outs:" in (repo_copy / "data/smoke.dvc").read_text()

    # ablations (SPEC §3): plain DPO and offline MCTS train on the closed loop's iteration-1 search
    # (same policy, config and seed) instead of repeating it; only plain DPO searches again, at iteration 2
    ablations = snakemake(repo_copy, "-n", "--config", "loop={ablations: [plain_dpo, offline_mcts]}")
    assert ablations.returncode == 0, ablations.stderr[-2000:]
    assert planned_jobs(ablations.stdout) == {"mcts": 1, "mcts_merge": 1, "dpo": 4, "evaluate": 8, "report": 1,
                                              "dvc_views": 1, "all": 1}
    assert "results/smoke/ablations/plain_dpo/iter2/mcts/merged" in ablations.stdout
    assert "results/smoke/ablations/plain_dpo/iter1/mcts" not in ablations.stdout
    # only their last policies evaluated: the same jobs but two evaluations, and none of the run's rerun
    last = snakemake(repo_copy, "-n", "--config", "loop={ablations: [plain_dpo, offline_mcts]}",
                     "eval={ablation_iterations: last}")
    assert last.returncode == 0, last.stderr[-2000:]
    assert planned_jobs(last.stdout) == {"mcts": 1, "mcts_merge": 1, "dpo": 4, "evaluate": 4, "report": 1,
                                         "dvc_views": 1, "all": 1}
    assert "results/smoke/eval/ablations/plain_dpo/iter1" not in last.stdout

    second = snakemake(repo_copy)
    assert second.returncode == 0 and "Nothing to be done" in second.stdout + second.stderr

    # the decoding comparison (SPEC §1): methods × {sft, last policy} × tasks, then the report
    decodings = snakemake(repo_copy, "-n", "--config",
                          "decodings={methods: [greedy, self_consistency, beam_self_eval], n_questions: 4}")
    assert decodings.returncode == 0, decodings.stderr[-2000:]
    assert planned_jobs(decodings.stdout) == {"evaluate_decoding": 6, "report": 1, "dvc_views": 1, "all": 1}
    assert "output: results/smoke/decodings/iter2/synthetic/beam_self_eval" in decodings.stdout

    # one changed setting reruns only what it invalidates: SFT and everything downstream of it (its
    # evals, both loop iterations, the report); never the data or the base-model evals
    changed = snakemake(repo_copy, "-n", "--config", "sft={learning_rate: 0.001}")
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert planned_jobs(changed.stdout) == {"sft": 1, "evaluate": 6, "mcts": 2, "mcts_merge": 2, "dpo": 2,
                                            "report": 1, "dvc_views": 1, "all": 1}
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


def test_seeds_plan_the_experiment_once_per_seed(repo_copy):
    """``seeds: [0, 1, 2]`` plans every job of a single run once per seed (rules seed<k>_*), the
    shared data once, and the report over seeds; the single run's plan is unchanged."""
    single = snakemake(repo_copy, "-n")
    seeded = snakemake(repo_copy, "-n", "--config", "seeds=[0, 1, 2]")
    assert single.returncode == 0 and seeded.returncode == 0, seeded.stderr[-2000:]
    one, three = planned_jobs(single.stdout), planned_jobs(seeded.stdout)
    shared = {"data": 2, "track_data": 1, "dvc_views": 1, "all": 1}
    per_run = {rule: n for rule, n in one.items() if rule not in shared}
    assert {rule: n for rule, n in one.items() if rule in shared} == shared
    assert three == {**shared, "seeds_report": 1, **{f"seed{s}_{rule}": n for s in range(3) for rule, n in per_run.items()}}
    assert sum(n for rule, n in three.items() if rule.startswith("seed") and rule != "seeds_report") == 3 * sum(
        per_run.values())
    assert "output: results/smoke/seed2/iter2/dpo" in seeded.stdout and "output: results/smoke/report.md" in seeded.stdout
    assert "output: results/smoke/sft\n" in single.stdout


def test_same_seed_same_machine_gives_byte_identical_artifacts(smoke_local_run):
    """Determinism (issue 19): the smoke run's SFT weights, iteration-1 pairs and DPO weights and
    an evaluation, made again from the same data with the same seed into another results dir,
    are byte-identical but for the results dir in the recorded paths."""
    repo, first = smoke_local_run
    assert first.returncode == 0, first.stderr[-3000:]
    # the data stays (its view names results_dir, so only mtime may trigger a rerun)
    again = snakemake(repo, "--rerun-triggers", "mtime", "--config", "results_dir=results_again", "--",
                      "results_again/smoke/iter1/dpo", "results_again/smoke/eval/sft/synthetic")
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = repo / "results" / "smoke", repo / "results_again" / "smoke"
    for rel in ["sft/model/model.safetensors", "iter1/mcts/merged/pairs.jsonl", "iter1/mcts/merged/trees.jsonl",
                "iter1/dpo/model/model.safetensors", "eval/sft/synthetic/predictions.jsonl"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes().replace(b"results_again/", b"results/"), rel
    metrics = [json.loads((d / "eval/sft/synthetic/metrics.json").read_text()) for d in (a, b)]
    for m in metrics:
        m.pop("model")
    assert metrics[0] == metrics[1]
