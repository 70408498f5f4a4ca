"""Artifact lineage with real git, DVC and Snakemake in temp repos (no mocks).

One smoke-config run of the DAG up to policy_2 (+ the base-model evaluations, which run beside
SFT; --cores 2) is shared by the module: every artifact is recorded in DVC by its own stage,
lineage of policy_2 reaches the data through every stage,
a one-byte change to a pairs file fails verify naming it, and push → fresh clone → pull
leaves Snakemake nothing to do.
"""

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from conftest import ROOT, copy_repo

from closedloop import artifacts, lineage

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
CLOSEDLOOP = [sys.executable, "-m", "closedloop"]
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
# a subset of the smoke DAG (the whole one runs in test_dag.py): the loop up to policy_2, the
# base-model evaluations (parallel to SFT with --cores 2) and data/smoke.dvc
TARGETS = ["results/smoke/iter2/dpo", "results/smoke/eval/base/synthetic", "results/smoke/eval/base/arc_challenge",
           "data/smoke.dvc"]


def env() -> dict:
    """Subprocesses import this checkout's closedloop (PYTHONPATH) and find its console script."""
    src = str(ROOT / "src")
    pythonpath = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def smk(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run([*SNAKEMAKE, *args, "--cores", "2", "--configfile", "configs/smoke.yaml"], repo)  # after targets


def lineage_cli(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run([*CLOSEDLOOP, "lineage", *args], repo)


# ---------------------------------------------------------------- fast: parallel recording

WRITER = """
import sys
from pathlib import Path
from closedloop import artifacts
i = int(sys.argv[1])
for final in (Path("results/x/a%d" % i), Path("data/x/t%d" % i)):
    with artifacts.artifact_dir(final, "data", {"seed": i}, {}, i) as out:
        (out / "rows.jsonl").write_text("row %d\\n" % i * 1000)
"""


def test_parallel_stages_record_every_artifact(tmp_path):
    """Six processes finishing at once: each result gets its .dvc, data.dvc covers all data."""
    repo = copy_repo(tmp_path / "repo")
    (repo / "data").mkdir()
    (repo / "data" / "keep").write_text("x\n")
    assert run(["dvc", "add", "-q", "data"], repo).returncode == 0
    n = 6
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(i)], cwd=repo, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    for i in range(n):
        dvc_file = repo / "results" / "x" / f"a{i}.dvc"
        assert dvc_file.is_file(), dvc_file
        assert artifacts.content_hash(repo / "results" / "x" / f"a{i}") == json.loads(
            (repo / "results" / "x" / f"a{i}" / "provenance.json").read_text())["artifact"]["sha256"]
    assert not list((repo / "data" / "x").glob("*.dvc"))  # inside the tracked data dir: no nested .dvc
    status = run(["dvc", "status", "--json"], repo)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr
    assert "nfiles: 19" in (repo / "data.dvc").read_text()  # keep + 6 × (rows, config, provenance)
    ok = lineage_cli(repo, "verify")
    assert ok.returncode == 0 and "12 artifacts checked, 0 no longer match" in ok.stderr, ok.stderr


def test_recording_switch_and_stages_outside_a_dvc_repo(tmp_path, monkeypatch):
    from closedloop import dvc_store

    assert dvc_store.repo_root(tmp_path) is None and dvc_store.record([tmp_path]) == []  # no repo: nothing
    assert run(["dvc", "init", "-q", "--no-scm"], tmp_path).returncode == 0
    monkeypatch.setenv(dvc_store.ENV, "0")
    with artifacts.artifact_dir(tmp_path / "results" / "a", "data", {"seed": 0}, {}, 0) as out:
        (out / "x.txt").write_text("x\n")
    assert not (tmp_path / "results" / "a.dvc").exists()
    monkeypatch.setenv(dvc_store.ENV, "maybe")
    with pytest.raises(dvc_store.DVCRecordError, match="CLOSEDLOOP_DVC='maybe'"):
        dvc_store.record([tmp_path / "results" / "a"])
    monkeypatch.setenv(dvc_store.ENV, "auto")
    assert dvc_store.record([tmp_path / "results" / "a"]) == [tmp_path / "results" / "a"]
    assert "path: a" in (tmp_path / "results" / "a.dvc").read_text()


def test_verify_of_a_missing_path_and_an_unrecorded_artifact_fail(tmp_path):
    assert lineage_cli(tmp_path, "verify", "nowhere").returncode == 2
    assert "no provenance record" in lineage_cli(tmp_path, str(tmp_path)).stderr


# ---------------------------------------------------------------- the smoke DAG, once

@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory):
    """The smoke DAG's TARGETS run once with --cores 2 in a fresh git + DVC repo; .dvc files committed."""
    repo = copy_repo(tmp_path_factory.mktemp("lineage") / "repo")
    out = smk(repo, *TARGETS)
    assert out.returncode == 0, out.stderr[-4000:]
    assert run(["git", "add", "-A"], repo).returncode == 0
    assert run([*GIT, "commit", "-qm", "smoke run"], repo).returncode == 0
    return repo


def records(repo: Path) -> dict[str, dict]:
    return {str(f.relative_to(repo)): json.loads(f.read_text())
            for f in lineage.find_records(repo / "results") + lineage.find_records(repo / "data")}


@pytest.mark.slow
def test_every_stage_output_is_recorded_in_dvc(smoke_repo):
    recs = records(smoke_repo)
    stages = sorted(r["stage"] for r in recs.values())
    assert stages.count("data") == 2 and stages.count("mcts") == 4 and stages.count("mcts_merge") == 2
    assert stages.count("dpo") == 2 and stages.count("evaluate") == 2 and stages.count("sft") == 1
    assert len(stages) == 13
    for rec_file, rec in recs.items():
        assert rec["artifact"]["sha256"] and rec["artifact"]["files"], rec_file
        assert all(i.get("artifact") and i["sha256"] for i in rec["inputs"].values()), rec_file
        art = Path(rec["artifact"]["path"])
        if rec["stage"] != "data":  # results: one .dvc per artifact, committed to git
            dvc_file = smoke_repo / art.with_name(art.name + ".dvc")
            assert dvc_file.is_file(), dvc_file
    assert run(["git", "ls-files", "data"], smoke_repo).stdout == "data/smoke.dvc\n"  # the payload is in DVC
    assert run(["git", "ls-files", "--error-unmatch", "data/smoke.dvc", "results/smoke/eval/base/synthetic.dvc",
                "results/smoke/iter2/dpo.dvc"], smoke_repo).returncode == 0
    status = run(["dvc", "status", "--json"], smoke_repo)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout
    # --cores 2 ran jobs side by side: at least two recorded stage processes overlapped in time
    spans = sorted((datetime.fromisoformat(r["process_started"]), datetime.fromisoformat(r["finished"]))
                   for r in recs.values())
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)), spans


@pytest.mark.slow
def test_lineage_of_the_iteration_2_model_reaches_the_data(smoke_repo):
    out = lineage_cli(smoke_repo, "results/smoke/iter2/dpo/model", "--json")
    assert out.returncode == 0, out.stderr
    graph = json.loads(out.stdout)
    arts, edges = graph["artifacts"], graph["edges"]
    assert graph["artifact"] == "results/smoke/iter2/dpo"
    assert {a["stage"] for a in arts.values()} == {"dpo", "mcts_merge", "mcts", "sft", "data"}
    assert all(e["from"] in arts and e["state"] == "ok" for e in edges), edges

    def chain(key: str) -> list[str]:  # follow the policy / pairs / data inputs back to the raw data
        ins = {e["input"]: e["from"] for e in edges if e["to"] == key}
        nxt = ins.get("pairs") or ins.get("shard0") or ins.get("policy") or ins.get("data")
        return [arts[key]["stage"]] + (chain(nxt) if nxt else [])

    assert chain("results/smoke/iter2/dpo") == ["dpo", "mcts_merge", "mcts", "dpo", "mcts_merge", "mcts", "sft",
                                                 "data"]
    data = arts["data/smoke/synthetic"]
    assert data["config_diff"]["data.tasks.synthetic.n_train"] == [256, 32]
    assert arts["results/smoke/sft"]["config_diff"]["model.kind"] == ["embedded", "tiny"]
    assert arts["results/smoke/iter2/dpo"]["code"]["git_commit"]

    tree = lineage_cli(smoke_repo, "results/smoke/iter2/dpo")
    assert tree.returncode == 0 and tree.stdout.startswith("results/smoke/iter2/dpo  [dpo]  sha256:")
    assert "data: data/smoke/synthetic  [data]" in tree.stdout and "(shown above)" in tree.stdout
    assert "model.kind: 'embedded'→'tiny'" in tree.stdout
    mermaid = lineage_cli(smoke_repo, "results/smoke/iter2/dpo", "--mermaid").stdout
    assert mermaid.startswith("flowchart BT") and mermaid.count("-->") == len(edges)
    dot = lineage_cli(smoke_repo, "results/smoke/iter2/dpo", "--dot").stdout
    assert dot.startswith("digraph lineage {") and dot.count(" -> ") == len(edges)
    base = json.loads(lineage_cli(smoke_repo, "results/smoke/eval/base/synthetic/metrics.json", "--json").stdout)
    assert sorted(a["stage"] for a in base["artifacts"].values()) == ["data", "evaluate"]


@pytest.mark.slow
def test_one_changed_byte_in_a_pairs_file_fails_verify_and_is_named(smoke_repo):
    ok = lineage_cli(smoke_repo, "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    pairs = smoke_repo / "results/smoke/iter1/mcts/shards/1/pairs.jsonl"
    original = pairs.read_bytes()
    try:
        pairs.write_bytes(original[:10] + bytes([original[10] ^ 1]) + original[11:])
        for target in ([], ["results/smoke/iter2/dpo"]):
            bad = lineage_cli(smoke_repo, "verify", *target)
            assert bad.returncode == 1, bad.stdout + bad.stderr
            assert f"MODIFIED {pairs}" in bad.stdout and "results/smoke/iter1/mcts/shards/1 [mcts]" in bad.stdout
            assert "1 no longer match their record: results/smoke/iter1/mcts/shards/1" in bad.stderr
        other = lineage_cli(smoke_repo, "verify", "results/smoke/eval/base/synthetic")  # not in that chain
        assert other.returncode == 0, other.stdout
    finally:
        pairs.write_bytes(original)


@pytest.mark.slow
def test_push_fresh_clone_pull_then_snakemake_has_nothing_to_do(smoke_repo):
    pushed = lineage_cli(smoke_repo, "push")
    assert pushed.returncode == 0, pushed.stderr
    remote = smoke_repo.parent / "closedloop-dvc-remote"  # the default remote: a directory beside the repo
    assert (remote / "files" / "md5").is_dir()
    clone = smoke_repo.parent / "clone"
    assert run(["git", "clone", "-q", str(smoke_repo), str(clone)], smoke_repo.parent).returncode == 0
    assert not (clone / "results/smoke/iter2/dpo").exists()
    pulled = lineage_cli(clone, "pull")
    assert pulled.returncode == 0, pulled.stderr
    model = "results/smoke/iter2/dpo/model/model.safetensors"
    assert artifacts.sha256_file(clone / model) == artifacts.sha256_file(smoke_repo / model)
    plan = smk(clone, "-n", *TARGETS)
    assert plan.returncode == 0, plan.stderr
    assert "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout[-3000:]
    assert lineage_cli(clone, "verify").returncode == 0
