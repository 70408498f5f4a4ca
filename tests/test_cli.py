"""The `closedloop` command line."""

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "closedloop", *args], cwd=cwd, capture_output=True, text=True)


def test_show_config_merges_file_and_overrides():
    out = cli("show-config", "--config", "configs/smoke.yaml", "eval.k=7", "seed=5")
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["experiment"] == "smoke" and shown["eval"]["k"] == 7 and shown["seed"] == 5
    assert shown["model"]["kind"] == "tiny"


def test_config_error_exits_2_naming_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("eval:\n  batch_size: many\n")
    out = cli("show-config", "--config", str(bad))
    assert out.returncode == 2
    assert str(bad) in out.stderr and "eval.batch_size" in out.stderr


def test_run_stage_data_from_the_command_line(tmp_path):
    out = cli("run-stage", "data", "--config", str(ROOT / "configs/smoke.yaml"), f"data_dir={tmp_path}",
              "job.task=synthetic")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "smoke" / "synthetic" / "heldout.jsonl").is_file()


def test_unknown_stage_and_stray_argument_are_rejected():
    assert cli("run-stage", "nope").returncode == 2
    out = cli("show-config", "--bogus")
    assert out.returncode == 2 and "--bogus" in out.stderr
