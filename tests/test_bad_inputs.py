"""Bad inputs and faults (issue 15; the table is docs/bad_inputs.md): each case asserts the
exit code, the message (file, key or line named) and that no artifact was lost, changed or
marked done. Real Snakemake, git and the CLI in temp repos; the tiny model where a model runs.

Groups: names that reach a path or a shell, config ranges (refused when the config loads),
data files, model files, faults (resume from another input, stale temp dirs, full disk,
two runs at once), lineage verify.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import unittest.mock
from pathlib import Path

import pytest
from conftest import ROOT, copy_repo

from closedloop import artifacts, cli, config, paths

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def env() -> dict:
    """Subprocesses import this checkout's closedloop (PYTHONPATH) and find its console script."""
    pythonpath = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def snapshot(top: Path) -> dict[str, str]:
    """Every file (with its sha256) and directory under ``top``; Snakemake's own .snakemake/ and
    git's .git/ left out."""
    return {p.relative_to(top).as_posix(): artifacts.sha256_file(p) if p.is_file() else "dir"
            for p in sorted(top.rglob("*")) if not {".snakemake", ".git"} & set(p.relative_to(top).parts)}


def snakemake(repo: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "--cores", "1", *args], cwd=repo, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """``closedloop ...`` in this process: (exit status, stderr)."""
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------- names that reach a path or a shell

INJECTIONS = [("experiment", "x;touch pwned_X;"), ("experiment", "my exp"), ("experiment", "../../x")]


@pytest.fixture(scope="module")
def bare_repo(tmp_path_factory):
    """A copy of the checkout (git, no DVC data) that refusals must leave exactly as it is."""
    return copy_repo(tmp_path_factory.mktemp("bad_inputs") / "repo")


@pytest.mark.parametrize("key,value", INJECTIONS)
def test_unsafe_names_run_and_write_nothing(bare_repo, key, value):
    """Issue 15 §1: through real ``snakemake --configfile``, the name is refused when the config
    loads: no shell runs (no ``pwned_X``), nothing appears in or beside the checkout."""
    outside = bare_repo.parent
    config_file = outside / "bad.yaml"
    config_file.write_text(json.dumps({key: value}))
    before, around = snapshot(bare_repo), sorted(p.name for p in outside.iterdir())
    run = snakemake(bare_repo, "--configfile", "configs/smoke.yaml", str(config_file))
    assert run.returncode == 1
    assert f"{config_file} + configs/default.yaml: key '{key}': expected a name of letters" in run.stderr, run.stderr
    assert snapshot(bare_repo) == before and sorted(p.name for p in outside.iterdir()) == around
    assert not list(outside.rglob("pwned_X"))


def test_every_wildcard_that_reaches_a_shell_is_quoted():
    """Every ``{...}`` in a rule's shell command is shell-quoted (``:q``), except ``{threads}`` (an int)."""
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        for match in re.finditer(r"shell:\s*\n((?:\s+\".*\"\n)+)", smk.read_text()):
            for field in re.findall(r"(?<!\{)\{([^{}]+)\}", match.group(1)):
                assert field == "threads" or field.endswith(":q"), f"{smk.name}: {{{field}}} is not quoted"


BAD_NAMES = [
    ("data_dir=../outside", "key 'data_dir': expected a path of names"),
    ("results_dir=/etc/closedloop", "key 'results_dir': absolute path '/etc/closedloop' is outside the allowed roots"),
    ("results_dir=results/.hidden", "key 'results_dir': expected a path of names"),
    ("experiment=-rf", "key 'experiment': expected a name"),
    ("experiment=" + "x" * 101, "key 'experiment': expected a name"),
    ("data.tasks.a$b.source=synthetic", "key 'data.tasks.a$b': expected a name"),
    ("results_dir=README.md", "key 'results_dir': 'README.md' is a file (expected a directory"),
]


@pytest.mark.parametrize("override,message", BAD_NAMES, ids=[o.split("=")[0] + str(i) for i, (o, _) in
                                                              enumerate(BAD_NAMES)])
def test_unsafe_paths_are_refused_when_the_config_loads(capsys, monkeypatch, override, message):
    monkeypatch.chdir(ROOT)
    rc, err = run_cli(capsys, "show-config", "--config", str(ROOT / "configs/smoke.yaml"), override)
    assert rc == 2 and f"closedloop: config error: {ROOT / 'configs/smoke.yaml'} + command line: {message}" in err


# ---------------------------------------------------------------- config values out of range

BAD_VALUES = [  # override, the message (after "key '")
    ("mcts.temperature=-1", "mcts.temperature': expected a number > 0 (the search samples its children), got -1"),
    ("dpo.batch_size=0", "dpo.batch_size': expected a number >= 1, got 0"),
    ("eval.decoding=sampled  eval.temperature=-1",
     "eval.temperature': expected a number > 0 (it samples for sampled), got -1"),
    ("decodings.methods=[beam_self_eval]  eval.beam_temperature=0",
     "eval.beam_temperature': expected a number > 0 (beam_self_eval samples), got 0"),
    ("decodings.models=[iter5]", "decodings.models': 'iter5' is not an iteration of the loop (expected iter1..iter2"),
    ("dpo.per_iteration={5: {beta: 0.2}}", "dpo.per_iteration.5': expected an iteration number in 1..2"),
    ("dpo.per_iteration={2: {beta: -0.1}}", "dpo.per_iteration.2.beta': expected a number > 0, got -0.1"),
    ("dpo.per_iteration={2: {batch_size: 0}}", "dpo.per_iteration.2.batch_size': expected a number >= 1, got 0"),
    ("sft.learning_rate=0", "sft.learning_rate': expected a number > 0, got 0.0"),
    ("sft.warmup_ratio=1.5", "sft.warmup_ratio': expected a number in [0, 1), got 1.5"),
    ("sft.max_steps=0", "sft.max_steps': expected -1 (train for 'sft.epochs') or an integer >= 1, got 0"),
    ("sft.lr_scheduler=cosinus", "sft.lr_scheduler': expected one of ['linear', 'cosine'"),
    ("mcts.top_p=0", "mcts.top_p': expected a number in (0, 1], got 0.0"),
    ("mcts.n_shards=9", "mcts.n_shards': expected a number in [1, 4] (mcts.n_prompts: a shard per prompt at most)"),
    ("mcts.gamma=1.5", "mcts.gamma': expected a number in [0, 1], got 1.5"),
    ("data.tasks.synthetic.synthetic.max_steps=1",
     "data.tasks.synthetic.synthetic.max_steps': expected a number >= 2 (data.tasks.synthetic.synthetic.min_steps)"),
    ("data.max_question_chars=0", "data.max_question_chars': expected a number >= 1, got 0"),
    ("loop.instance_samples=1", "loop.instance_samples': expected a number >= 2 (a correct and an incorrect sample)"),
    ("eval.top_p=1.5  eval.decoding=self_consistency", "eval.top_p': expected a number in (0, 1]"),
    ("model.lora.enabled=true  model.lora.r=0", "model.lora.r': expected a number >= 1, got 0"),
    ("vlm.vdpo.beta=0", "vlm.vdpo.beta': expected a number > 0, got 0.0"),
    ("vlm.sft.batch_size=0", "vlm.sft.batch_size': expected a number >= 1, got 0"),
    ("vlm.pope.ci_level=1", "vlm.pope.ci_level': expected a number in (0, 1), got 1.0"),
    ("model.tiny.num_hidden_layers=0", "model.tiny.num_hidden_layers': expected a number >= 1, got 0"),
    ("coral.decoding.eps=2", "coral.decoding.eps': expected a number in [0, 1], got 2.0"),
    ("coral.stage2.learning_rate=0", "coral.stage2.learning_rate': expected a number > 0, got 0.0"),
    ("coral.window=0", "coral.window': expected a number >= 1, got 0"),
    ("vlcot.rejection.temperature=0", "vlcot.rejection.temperature': expected a number > 0, got 0.0"),
    ("vlcot.sft.warmup_ratio=1", "vlcot.sft.warmup_ratio': expected a number in [0, 1), got 1.0"),
    ("vlcot.head.select_threshold=1.5", "vlcot.head.select_threshold': expected a number in [0, 1], got 1.5"),
]


@pytest.mark.parametrize("overrides,message", BAD_VALUES, ids=[o.split("=")[0] for o, _ in BAD_VALUES])
def test_out_of_range_values_are_refused_when_the_config_loads(capsys, overrides, message):
    rc, err = run_cli(capsys, "show-config", "--config", str(ROOT / "configs/smoke.yaml"), *overrides.split("  "))
    assert rc == 2 and f"{ROOT / 'configs/smoke.yaml'} + command line: key '{message}" in err, err


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory):
    """A repo copy with one finished artifact, ``data/smoke/synthetic``, built by real Snakemake."""
    repo = copy_repo(tmp_path_factory.mktemp("finished") / "repo")
    run = snakemake(repo, "--configfile", "configs/smoke.yaml", "--", "data/smoke/synthetic")
    assert run.returncode == 0, run.stderr[-3000:]
    return repo


SNAKEMAKE_REFUSALS = [  # --config values that also change the finished data job's params
    ("data={tasks: {synthetic: {n_heldout: -5}}}", "key 'data.tasks.synthetic': n_train and n_validation must be"),
    ("dpo={batch_size: 0}", "key 'dpo.batch_size': expected a number >= 1, got 0"),
    ("decodings={methods: [greedy], models: [iter5]}", "key 'decodings.models': 'iter5' is not an iteration"),
]


@pytest.mark.parametrize("value,message", SNAKEMAKE_REFUSALS, ids=["n_heldout", "dpo_batch", "iter5"])
def test_a_refused_value_leaves_the_finished_artifact_in_place(data_repo, value, message):
    """Issue 15 §3: the refusal comes when Snakemake parses the config, before it deletes an output
    whose params changed; the finished data artifact is byte-identical and nothing is marked incomplete."""
    before = snapshot(data_repo)
    run = snakemake(data_repo, "--configfile", "configs/smoke.yaml", "--forcerun", "data", "--config", value,
                    "--", "data/smoke/synthetic")
    assert run.returncode == 1 and message in run.stderr, run.stderr[-2000:]
    assert snapshot(data_repo) == before
    assert not any((data_repo / ".snakemake" / "incomplete").glob("*"))


# ---------------------------------------------------------------- faults: resume, stale temp dirs, full disk

def _stop_after(monkeypatch, owner, name: str, calls: int):
    """Let ``owner.name`` run ``calls`` times, then stop the job as SIGTERM does (the CLI turns
    SIGTERM into ``SystemExit(143)``): the resume state written so far stays behind."""
    original, seen = getattr(owner, name), []

    def stopping(*args, **kwargs):
        if len(seen) == calls:
            raise SystemExit(143)
        seen.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, stopping)


def _build(cfg):
    from closedloop.stages import data, sft

    cfg.sft.max_steps, cfg.sft.batch_size, cfg.sft.lr_scheduler = 1, 2, "constant"  # one step at the full rate
    cfg.job.task = cfg.sft.task
    data.main(cfg)
    sft.main(cfg)


@pytest.mark.slow
def test_mcts_shard_never_resumes_trees_of_another_policy(smoke_cfg, monkeypatch):
    """Issue 15 §2a: a shard stopped after its first batch, SFT retrained with another learning
    rate, the shard rerun: its trees are those of a clean run from the new policy, not the old batch."""
    from closedloop.loop.search import Searcher
    from closedloop.stages import mcts

    cfg = smoke_cfg
    cfg.mcts.n_prompts, cfg.mcts.n_shards, cfg.mcts.trees_per_batch = 2, 1, 1
    cfg.mcts.b1, cfg.mcts.simulations, cfg.mcts.max_step_tokens, cfg.mcts.max_completion_tokens = 2, 1, 8, 12  # small
    cfg.job.iteration, cfg.job.shard = 1, 0
    _build(cfg)
    with monkeypatch.context() as patch:
        _stop_after(patch, Searcher, "search", 1)
        with pytest.raises(SystemExit):
            mcts.main(cfg)
    work = paths.mcts_dir(cfg, 1) / ".work"
    [old_batch] = work.glob("shard0-*/batch00000.jsonl")
    old_tree = artifacts.read_jsonl(old_batch)
    assert not paths.mcts_shard_dir(cfg, 1, 0).exists()  # nothing marked done
    cfg.sft.learning_rate = 0.05
    _build(cfg)
    mcts.main(cfg)  # the rerun
    resumed = artifacts.read_jsonl(paths.mcts_shard_dir(cfg, 1, 0) / "trees.jsonl")
    assert not old_batch.exists()
    shutil.rmtree(paths.mcts_dir(cfg, 1))
    mcts.main(cfg)  # a clean run from the new policy
    clean = artifacts.read_jsonl(paths.mcts_shard_dir(cfg, 1, 0) / "trees.jsonl")
    assert resumed == clean and old_tree[0]["nodes"] != clean[0]["nodes"]


@pytest.mark.slow
def test_dpo_never_resumes_a_checkpoint_trained_from_another_sft(smoke_cfg, monkeypatch, tmp_path, capsys):
    """Issue 15 §2b: DPO checkpoints every step (the Slurm launch setting), stopped while saving
    policy_1, SFT retrained with another learning rate, DPO rerun: it trains from step 1 on the
    new SFT model instead of "resuming from .../checkpoint-2" of the old one."""
    from closedloop import models
    from closedloop.stages import dpo

    launch_file = tmp_path / "launch.yaml"
    launch_file.write_text("checkpoint_steps: 1\n")
    monkeypatch.setenv("CLOSEDLOOP_LAUNCH_CONFIG", str(launch_file))
    cfg = smoke_cfg
    cfg.job.iteration = 1
    _build(cfg)
    pair = {"q_chosen": 1.0, "q_rejected": -1.0, "alpha": 0.2}
    rows = [{"prompt": f"Q: {a}+{b}?\n", "chosen": f"{a} + {b} = {a + b}.\n", "rejected": f"{a} + {b} = {a + b + 1}.\n",
             **pair} for a, b in ((2, 3), (4, 1), (6, 2), (1, 1))]
    with artifacts.artifact_dir(paths.mcts_dir(cfg, 1) / "merged", "mcts_merge", {}, {}, 0) as out:
        (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with monkeypatch.context() as patch:
        _stop_after(patch, models, "save_policy", 0)
        with pytest.raises(SystemExit):
            dpo.main(cfg)
    assert list((paths.iter_dir(cfg, 1) / ".work").glob("dpo-*/trainer/checkpoint-2"))
    assert not paths.dpo_dir(cfg, 1).exists()
    cfg.sft.learning_rate = 0.05
    _build(cfg)
    capsys.readouterr()
    dpo.main(cfg)
    out = capsys.readouterr().out
    assert "resuming from" not in out and "dpo: trained steps 1..2 in this run" in out
    prov = json.loads((paths.dpo_dir(cfg, 1) / "provenance.json").read_text())
    assert prov["inputs"]["policy"]["sha256"] == artifacts.content_hash(paths.policy_dir(cfg, 0))
    assert not (paths.iter_dir(cfg, 1) / ".work").exists() or not any((paths.iter_dir(cfg, 1) / ".work").iterdir())


def test_temp_dirs_of_dead_jobs_are_removed_at_the_next_start(tmp_path, capsys):
    """Issue 15 §5: a killed job's ``.<stage>.tmp-*`` (a partial model) goes when the stage next
    starts (:func:`closedloop.checkpoints.work_dir`, :func:`closedloop.artifacts.artifact_dir`);
    a live process's and another host's are left alone, and no finished artifact is touched."""
    from closedloop import checkpoints

    gone = subprocess.Popen(["true"])
    gone.wait()
    host, final = socket.gethostname(), tmp_path / "results" / "x" / "sft"
    with artifacts.artifact_dir(final.with_name("data"), "data", {}, {}, 0) as out:
        (out / "rows.jsonl").write_text("{}\n")
    names = {"dead": f".sft.tmp-{host}-{gone.pid}-1", "old_format": f".sft.tmp-{gone.pid}-1",
             "replaced": f".sft.old-{gone.pid}", "live": f".sft.tmp-{host}-{os.getpid()}-1",
             "other_host": f".sft.tmp-node-17-{gone.pid}-1", "other_artifact": f".data.tmp-{host}-{gone.pid}-1"}
    for name in names.values():
        (final.parent / name / "model").mkdir(parents=True)
        (final.parent / name / "model" / "model.safetensors").write_bytes(b"partial")
    finished = snapshot(final.with_name("data"))
    checkpoints.work_dir(final, {"sft": {}}, {"data": final.with_name("data")})
    left = {key for key, name in names.items() if (final.parent / name).exists()}
    assert left == {"live", "other_host", "other_artifact"}
    assert f"removed {final.parent / names['dead']} (left by process {gone.pid}" in capsys.readouterr().out
    assert snapshot(final.with_name("data")) == finished
    with artifacts.artifact_dir(final.with_name("data"), "data", {}, {}, 0) as out:  # its next start
        (out / "rows.jsonl").write_text("{}\n")
    assert not (final.parent / names["other_artifact"]).exists()


# ---------------------------------------------------------------- data files (source: jsonl)

def _row(i, question=None, **kw):
    return json.dumps({"id": f"r{i}", "question": question or f"What is {i} + 1?", "answer": str(i + 1), **kw})


DATA_CASES = [  # id, heldout file content (bytes), extra overrides, message after "<file>:" (None: no line)
    ("non_utf8", _row(1).encode() + b"\n" + b'{"id": "r2", "question": "caf\xe9?", "answer": "1"}\n', [],
     "2: not valid UTF-8 (byte 30 of the line: b'\\xe9')"),
    ("question_too_long", (_row(1, "x" * 4001) + "\n").encode(), [],
     "1: question has 4001 characters, more than data.max_question_chars = 4000"),
    ("answer_too_long", (_row(1) + "\n" + json.dumps({"id": "a", "question": "q?", "answer": "9" * 11})).encode(),
     ["data.max_answer_chars=10"], "2: answer has 11 characters, more than data.max_answer_chars = 10"),
    ("too_many_rows", "".join(_row(i) + "\n" for i in range(3)).encode(), ["data.max_rows=2"],
     "3: more than data.max_rows = 2 rows"),
    ("empty_file", b"\n\n", [], " no rows (data.tasks.mine.heldout_path: expected at least one)"),
    ("bad_json", (_row(1) + "\n" + _row(2) + "\n{'id': 3}\n").encode(), [], "3: not valid JSON (Expecting property name enclosed in double quotes)"),
    ("missing_answer", json.dumps({"id": "a", "question": "q?"}).encode(), [], "1: missing required key 'answer'"),
    ("duplicate_id", (_row(1) + "\n" + _row(1) + "\n").encode(), [], "2: duplicate id 'r1'"),
    ("eleven_choices", json.dumps({"id": "a", "question": "q?", "answer": "A",
                                   "choices": [str(c) for c in range(11)]}).encode(), [],
     "1: 11 choices (expected 2..10, data.max_choices)"),
    ("empty_question", json.dumps({"id": "a", "question": "  ", "answer": "1"}).encode(), [], "1: empty question"),
    ("missing_file", None, [], " cannot read (No such file or directory) (data.tasks.mine.heldout_path)"),
]


@pytest.mark.parametrize("content,extra,message", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_task_files_name_file_and_line(capsys, tmp_path, content, extra, message):
    """Issue 15 §4: every refusal of a user's task file is one line naming ``file:line``; the data
    artifact is not written (nor its temp dir left behind)."""
    heldout = tmp_path / "heldout.jsonl"
    if content is not None:
        heldout.write_bytes(content)
    rc, err = run_cli(capsys, "run-stage", "data", "--config", str(ROOT / "configs/smoke.yaml"),
                      f"data_dir={tmp_path / 'data'}", "data.tasks.mine.source=jsonl",
                      f"data.tasks.mine.heldout_path={heldout}", "job.task=mine", *extra)
    assert rc == 2 and err.strip().splitlines()[-1] == f"closedloop: data: {heldout}:{message}".replace(":  ", ": ")
    assert not (tmp_path / "data" / "smoke").exists() or not any((tmp_path / "data" / "smoke").iterdir())


def test_train_heldout_overlap_ignores_case_and_spaces(capsys, tmp_path):
    """Issue 15 §4: the same question upper-cased with trailing spaces is caught as an overlap."""
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    train.write_text(_row(1, "What is 2 + 2?") + "\n" + _row(2) + "\n")
    heldout.write_text(_row(9, "WHAT IS  2 + 2?   ") + "\n")
    rc, err = run_cli(capsys, "run-stage", "data", "--config", str(ROOT / "configs/smoke.yaml"),
                      f"data_dir={tmp_path / 'data'}", "data.tasks.mine.source=jsonl", "data.tasks.mine.n_train=2",
                      f"data.tasks.mine.train_path={train}", f"data.tasks.mine.heldout_path={heldout}", "job.task=mine")
    assert rc == 2 and "closedloop: data: task mine: train row 'r1' also appears in the heldout split" in err
    assert not (tmp_path / "data" / "smoke" / "mine").exists()


# ---------------------------------------------------------------- model files

@pytest.fixture(scope="module")
def eval_dirs(tmp_path_factory):
    """data_dir/results_dir with the smoke synthetic data built, for evaluation refusals."""
    top = tmp_path_factory.mktemp("models")
    assert cli.main(["run-stage", "data", "--config", str(ROOT / "configs/smoke.yaml"), f"data_dir={top / 'data'}",
                     "job.task=synthetic"]) == 0
    return top


def _truncated_sft(results: Path) -> Path:
    from closedloop import models

    model = results / "smoke" / "sft" / "model"
    shutil.copytree(models.tiny_dir(config.load([ROOT / "configs/smoke.yaml"]).model), model)
    weights = model / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    return weights


MODEL_CASES = [  # id, overrides, how the message starts (a callable of the results dir)
    ("missing_dir", ["job.model=base", "model.kind=hf", "model.name_or_path=/nonexistent/model"],
     lambda r: "/nonexistent/model: no such model dir"),
    ("hub_id_offline", ["job.model=base", "model.kind=hf", "model.name_or_path=nobody/no-such-model"],
     lambda r: "nobody/no-such-model: cannot load the model: We couldn't connect"),
    ("not_a_model_dir", ["job.model=base", "model.kind=hf", f"model.name_or_path={ROOT / 'configs'}"],
     lambda r: f"{ROOT / 'configs'}: not a from_pretrained model dir (no config.json)"),
    ("truncated_weights", ["job.model=sft"], lambda r: f"{_truncated_sft(r)}: corrupt or truncated weights "
                                                       "(Error while deserializing header: incomplete metadata"),
]


@pytest.mark.parametrize("overrides,message", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_bad_models_fail_in_one_line_naming_the_file(capsys, eval_dirs, tmp_path, overrides, message):
    """Issue 15 §4: a missing model path, a hub id offline, a dir that is no model and truncated
    safetensors each give one line naming the path (no traceback); no evaluation is written."""
    results = tmp_path / "results"
    expected = message(results)
    rc, err = run_cli(capsys, "run-stage", "evaluate", "--config", str(ROOT / "configs/smoke.yaml"),
                      f"data_dir={eval_dirs / 'data'}", f"results_dir={results}", "job.task=synthetic", *overrides)
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"closedloop: evaluate: {expected}"), err
    assert not (results / "smoke" / "eval").exists() or not any((results / "smoke" / "eval").rglob("*.json"))


# ---------------------------------------------------------------- lineage verify

@pytest.fixture
def chain(tmp_path, monkeypatch):
    """A recorded chain in a temp root: data -> eval (metrics.json) -> report.md (a file artifact)."""
    monkeypatch.chdir(tmp_path)
    data, ev = Path("data/x/synthetic"), Path("results/x/eval/sft/synthetic")
    with artifacts.artifact_dir(data, "data", {"seed": 0}, {}, 0) as out:
        (out / "heldout.jsonl").write_text(_row(1) + "\n")
    with artifacts.artifact_dir(ev, "evaluate", {"eval": {"k": 4}}, {"data": data}, 0) as out:
        (out / "metrics.json").write_text('{"accuracy": 0.5}\n')
    write_report(ev)
    return tmp_path


def write_report(ev: Path) -> Path:
    """What stage report does: the text from the metrics, then its sidecars naming the metrics it read."""
    report, metrics = Path("results/x/report.md"), ev / "metrics.json"
    report.write_text(f"accuracy {json.loads(metrics.read_text())['accuracy']}\n")
    artifacts.write_sidecars(report.parent, "report", {"report": {}}, {"eval": metrics}, artifacts.now(), 0,
                             prefix="report.", output=artifacts.output_record(
                                 report, {report.name: artifacts.sha256_file(report)}, primary=report.name))
    return report


def _add_hidden(root):
    (root / "results/x/eval/sft/synthetic/.stray_hidden").write_text("x")


def _add_hidden_dir(root):
    (root / "results/x/eval/sft/synthetic/.hidden_dir").mkdir()
    (root / "results/x/eval/sft/synthetic/.hidden_dir/payload.bin").write_bytes(b"\0" * 8)


def _edit_sidecar(root):
    sidecar = root / "results/x/eval/sft/synthetic/config.yaml"
    sidecar.write_text(sidecar.read_text().replace("k: 4", "k: 8"))


def _fake_number(root):
    """Edit metrics.json, rebuild the report from it, restore metrics.json (issue 15 §5). A stage
    now refuses the edited input (issue 16, ``test_dag_promise.py``), so the report is written as
    an older version or a hand-made record would be: inputs hashed, not checked."""
    metrics = root / "results/x/eval/sft/synthetic/metrics.json"
    good = metrics.read_text()
    metrics.write_text('{"accuracy": 0.99}\n')
    with pytest.raises(artifacts.StaleInputError, match="input 'eval' .*metrics.json changed"):
        write_report(Path("results/x/eval/sft/synthetic"))
    unchecked = lambda stage, inputs: {name: artifacts.input_record(path) for name, path in inputs.items()}  # noqa: E731
    with unittest.mock.patch.object(artifacts, "check_inputs", unchecked):
        write_report(Path("results/x/eval/sft/synthetic"))
    metrics.write_text(good)


def _delete_producer(root):
    shutil.rmtree(root / "data/x/synthetic")


LINEAGE_CASES = [  # id, the fault, the line verify prints
    ("hidden_file", _add_hidden, "ADDED {root}/results/x/eval/sft/synthetic/.stray_hidden in results/x/eval/sft/"
                                 "synthetic [evaluate]: not in the record"),
    ("hidden_dir", _add_hidden_dir, "ADDED {root}/results/x/eval/sft/synthetic/.hidden_dir/payload.bin in "),
    ("sidecar_edit", _edit_sidecar, "MODIFIED {root}/results/x/eval/sft/synthetic/config.yaml in results/x/eval/sft/"
                                    "synthetic [evaluate]: config_hash recorded"),
    ("consumed_other_input", _fake_number, "STALE results/x/report.md [report]: input 'eval' "
                                           "results/x/eval/sft/synthetic/metrics.json was sha256"),
    ("deleted_producer", _delete_producer, "MISSING PRODUCER data/x/synthetic of input 'data' of results/x/eval/sft/"
                                           "synthetic [evaluate]: deleted"),
]


@pytest.mark.parametrize("fault,line", [c[1:] for c in LINEAGE_CASES], ids=[c[0] for c in LINEAGE_CASES])
def test_verify_finds_every_change_along_the_chain(chain, capsys, fault, line):
    """Issue 15 §5: ``closedloop lineage verify`` (exit 1) names a hidden file added to an artifact,
    an edited config sidecar, a consumer whose input is not what it consumed, a deleted producer."""
    rc, _ = run_cli(capsys, "lineage", "verify", "--root", str(chain))
    assert rc == 0
    fault(chain)
    rc = cli.main(["lineage", "verify", "--root", str(chain)])
    out = capsys.readouterr()
    assert rc == 1 and line.format(root=chain) in out.out, out.out


def test_vlm_report_records_its_content(tmp_path, monkeypatch, capsys):
    """Issue 15 §5: a clean V-DPO report no longer fails verify as UNRECORDED; an edit to it is named."""
    from closedloop.stages import vlm_report
    from closedloop.vlm import pope

    monkeypatch.chdir(tmp_path)
    cfg = config.load([ROOT / "configs/vlm_smoke.yaml"], ["vlm.pope.models=[sft]"])
    scores = pope.metrics_from_confusion(pope.confusion([1, 0, 1, 0], ["yes", "no", "no", "no"]))
    ci = {key: [0.0, 1.0] for key in scores}
    metrics = {"all": {**scores, "n": 4, "ci": ci}, "splits": {s: {**scores, "n": 4, "ci": ci} for s in pope.SPLITS}}
    with artifacts.artifact_dir(paths.pope_dir(cfg, "sft"), "pope", {}, {}, 0) as out:
        (out / "metrics.json").write_text(json.dumps(metrics))
    with artifacts.artifact_dir(paths.vlm_sft_dir(cfg), "vlm_sft", {}, {}, 0) as out:  # the report reads its stats
        (out / "stats.json").write_text(json.dumps({"rows": 0}))
    vlm_report.main(cfg)
    assert cli.main(["lineage", "verify", "--root", str(tmp_path)]) == 0
    report = paths.vlm_report_file(cfg)
    report.write_text(report.read_text() + "| vdpo | 99.9 |\n")
    assert cli.main(["lineage", "verify", "--root", str(tmp_path)]) == 1
    assert f"MODIFIED {tmp_path / report} in {report} [vlm_report]: recorded sha256" in capsys.readouterr().out


def test_full_disk_leaves_no_artifact_and_no_temp_dir(tmp_path):
    """A write that fails half way (RLIMIT_FSIZE standing in for a full disk): the stage fails
    naming the error, and neither the artifact nor its temp dir is left."""
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    run = subprocess.run([sys.executable, "-m", "closedloop", "run-stage", "data", "--config",
                          str(ROOT / "configs/smoke.yaml"), f"data_dir={tmp_path / 'data'}", "job.task=synthetic"],
                         env=env(), capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert run.returncode == 1 and "OSError: [Errno 27] File too large" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "data" / "smoke").exists() or not any((tmp_path / "data" / "smoke").iterdir())



def test_a_changed_file_is_named_once_not_again_at_each_consumer(chain, capsys):
    """A file edited on disk is its producer's MODIFIED line; its consumers, which read what the
    producer recorded, are not flagged again (the count names one artifact)."""
    metrics = chain / "results/x/eval/sft/synthetic/metrics.json"
    metrics.write_text('{"accuracy": 0.51}\n')
    assert cli.main(["lineage", "verify", "--root", str(chain)]) == 1
    out = capsys.readouterr()
    assert f"MODIFIED {metrics} in results/x/eval/sft/synthetic [evaluate]" in out.out and "STALE" not in out.out
    assert "3 artifacts checked, 1 no longer match their record: results/x/eval/sft/synthetic" in out.err


def test_a_second_run_at_once_is_refused_and_the_first_finishes(data_repo, tmp_path):
    """Two ``snakemake`` runs in one checkout: while the first's job runs (held open on a FIFO
    it reads as its task file), the second is refused by Snakemake's lock and writes nothing;
    the first then finishes with its artifact complete, the finished one untouched."""
    fifo = tmp_path / "heldout.jsonl"
    os.mkfifo(fifo)
    task = f"data={{tasks: {{mine: {{source: jsonl, heldout_path: {fifo}}}}}}}"
    args = ["--cores", "1", "--configfile", "configs/smoke.yaml", "--config", task, "--", "data/smoke/mine"]
    finished = snapshot(data_repo / "data" / "smoke" / "synthetic")
    first = subprocess.Popen([*SNAKEMAKE, *args], cwd=data_repo, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        incomplete = data_repo / ".snakemake" / "incomplete"
        for _ in range(3000):  # the job has started (so the lock is held) once its output is marked incomplete
            if incomplete.is_dir() and any(incomplete.iterdir()) or first.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"])
        second = subprocess.run([*SNAKEMAKE, *args], cwd=data_repo, env=env(), capture_output=True, text=True,
                                timeout=300)
        for _ in range(3000):  # each time the first job opens the FIFO to read, hand it its rows (the
            if first.poll() is not None:  # stage reads the file twice: its rows and its input hash)
                break
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader yet
                subprocess.run(["sleep", "0.1"])
                continue
            os.write(fd, "".join(_row(i) + "\n" for i in range(3)).encode())
            os.close(fd)
            subprocess.run(["sleep", "0.2"])  # let the reader see the end of the file before the next open
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, 9)
    assert second.returncode == 1 and "Directory cannot be locked" in second.stderr, second.stderr[-2000:]
    assert first.returncode == 0, err[-2000:]
    assert json.loads((data_repo / "data/smoke/mine/stats.json").read_text())["rows"]["heldout"] == 3
    assert snapshot(data_repo / "data" / "smoke" / "synthetic") == finished
