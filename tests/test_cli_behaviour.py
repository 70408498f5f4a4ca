"""How the command line behaves for a user: config errors name what set the bad value and the
field's own type; output into a closed pipe is quiet; a job's output goes to its log with one
line on the console; MCTS shows progress per tree."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from closedloop import artifacts, config, models, paths
from closedloop.loop.search import shard_rows
from closedloop.stages import data, mcts

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=ROOT, **kwargs):
    return subprocess.run([sys.executable, "-m", "closedloop", *args], cwd=cwd, capture_output=True, text=True,
                          **kwargs)


def write(tmp_path, text, name="mine.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,message", [
    ("sft:\n  batch_size: eight\n",
     "key 'sft.batch_size': Value 'eight' of type 'str' could not be converted to Integer (expected int)"),
    ("dpo:\n  beta: strong\n",
     "key 'dpo.beta': Value 'strong' of type 'str' could not be converted to Float (expected float)"),
    ("model:\n  revision: [1]\n",
     "key 'model.revision': Cannot convert 'ListConfig' to string: '[1]' (expected str or null)"),
    ("model:\n  lora:\n    target_modules: q_proj\n",
     "key 'model.lora.target_modules': Invalid value assigned: AnyNode is not a ListConfig, TupleConfig, list, "
     "or tuple. (expected list of str)"),
    ("eval:\n  decoding: best\n",  # an enum lists its values itself: no second "expected"
     "key 'eval.decoding': Invalid value 'best', expected one of [greedy, sampled, self_consistency, beam_self_eval, coral_blockwise]"),
])
def test_a_wrong_type_names_the_file_the_key_and_the_fields_own_type(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as err:
        config.load([path])
    assert str(err.value) == f"{path}: {message}"


def test_type_names_read_like_the_annotations():
    assert config.core.type_name(int | None) == "int or null"
    assert config.core.type_name(list[str]) == "list of str"
    assert config.core.type_name(config.Decoding) == "one of [greedy, sampled, self_consistency, beam_self_eval, coral_blockwise]"
    assert config.core.type_name(config.SFTConfig) == "a SFTConfig mapping"


def test_from_dict_blames_the_layer_that_set_the_bad_value():
    layers = [("configs/default.yaml", {"sft": {"learning_rate": 1e-4}}), ("configs/mine.yaml", {"seed": 3}),
              ("snakemake --config", {"sft": {"learnin_rate": 3e-5}})]
    merged = {"sft": {"learning_rate": 1e-4, "learnin_rate": 3e-5}, "seed": 3}
    with pytest.raises(config.ConfigError) as err:
        config.from_dict(merged, "configs/default.yaml + configs/mine.yaml", layers)
    assert str(err.value) == ("snakemake --config: key 'sft.learnin_rate': Key 'learnin_rate' not in 'SFTConfig'. "
                              "Did you mean: 'learning_rate'?")
    layers[1] = ("configs/mine.yaml", {"sft.batch_size": "eight"})  # a dotted key, as --config sft.batch_size=...
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"sft.batch_size": "eight"}, "all", layers[:2])
    assert str(err.value) == ("configs/mine.yaml (sft.batch_size=...): key 'sft.batch_size': Value 'eight' of type "
                              "'str' could not be converted to Integer (expected int)")


@pytest.mark.slow
def test_snakemake_config_typo_is_blamed_on_the_override_not_default_yaml(repo_copy):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", *args],  # noqa: E731
                                       cwd=repo_copy, env=env, capture_output=True, text=True, timeout=300)
    typo = run("--config", "sft={learnin_rate: 3e-5}")
    assert typo.returncode != 0
    out = typo.stdout + typo.stderr
    assert ("snakemake --config: key 'sft.learnin_rate': Key 'learnin_rate' not in 'SFTConfig'. "
            "Did you mean: 'learning_rate'?") in out, out[-2000:]
    assert "configs/default.yaml: key" not in out
    (repo_copy / "configs" / "mine.yaml").write_text("sft:\n  batch_size: eight\n")
    bad_file = run("--configfile", "configs/mine.yaml")
    out = bad_file.stdout + bad_file.stderr
    assert bad_file.returncode != 0
    assert ("configs/mine.yaml: key 'sft.batch_size': Value 'eight' of type 'str' could not be converted to "
            "Integer (expected int)") in out, out[-2000:]


def _closed_stdout(*args, cwd=ROOT):
    """Run the CLI with its stdout a pipe whose reader has gone (what `| head` leaves behind)."""
    proc = subprocess.Popen([sys.executable, "-m", "closedloop", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    return proc.wait(), err


def test_output_into_a_closed_pipe_is_quiet(tmp_path):
    final = tmp_path / "results" / "thing"
    with artifacts.artifact_dir(final, "data", {"seed": 0}, {}, 0) as out:
        (out / "rows.jsonl").write_text("{}\n" * 1000)
    assert _closed_stdout("lineage", str(final), "--json", cwd=tmp_path) == (141, "")
    assert _closed_stdout("show-config", "--config", "configs/smoke.yaml") == (141, "")
    assert _closed_stdout("lineage", "--help")[1] == ""  # argparse swallows the error itself: exit 0, also quiet


def test_run_stage_with_log_prints_one_line_and_keeps_the_output_in_the_log(tmp_path):
    log = tmp_path / "logs" / "data.log"
    out = cli("run-stage", "data", "--config", "configs/smoke.yaml", f"data_dir={tmp_path / 'data'}",
              "job.task=synthetic", "--log", str(log))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1, out.stdout
    assert re.fullmatch(rf"closedloop: data task=synthetic: done in \d+\.\d s: data: synthetic: .* \(log: {log}\)",
                        lines[0]), lines[0]
    assert "data: synthetic:" in log.read_text()


def test_run_stage_with_log_shows_the_logs_tail_when_it_fails(tmp_path):
    log = tmp_path / "data.log"
    out = cli("run-stage", "data", "--config", "configs/smoke.yaml", f"data_dir={tmp_path / 'data'}",
              "job.task=nope", "--log", str(log))
    assert out.returncode != 0 and out.stdout == ""
    first, *tail = out.stderr.splitlines()
    assert re.fullmatch(rf"closedloop: data task=nope: FAILED \(exit \d\) after \d+\.\d s; the last lines of {log}:",
                        first), first
    assert tail and all(line.startswith("  | ") for line in tail) and "nope" in tail[-1]


class RecordingBar:
    """Stands in for tqdm in stages.mcts: records the bar's settings and each update."""

    made: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.updates = kwargs, []
        RecordingBar.made.append(self)

    def update(self, n=1):
        self.updates.append(n)

    def close(self):
        pass


@pytest.mark.slow
def test_mcts_progress_counts_trees_as_they_finish(smoke_cfg, monkeypatch):
    """One tick per tree as it finishes inside a batch (smoke: one batch of 2 trees per shard), not per batch."""
    smoke_cfg.job.task = smoke_cfg.mcts.task
    data.main(smoke_cfg)
    # policy_0 = the tiny model itself, no SFT needed
    models.build_once(paths.policy_dir(smoke_cfg, 0), lambda tmp: shutil.copytree(models.tiny_dir(smoke_cfg.model), tmp))
    smoke_cfg.job.iteration, smoke_cfg.job.shard = 1, 0
    assert len(shard_rows(smoke_cfg, 0)) == 2 and smoke_cfg.mcts.trees_per_batch == 2  # both trees in one batch
    monkeypatch.setattr(mcts, "tqdm", RecordingBar)
    RecordingBar.made.clear()
    mcts.main(smoke_cfg)
    (bar,) = RecordingBar.made
    assert bar.kwargs == {"total": 2, "desc": "mcts iter1 shard0", "unit": "tree"}
    assert bar.updates == [1, 1]
