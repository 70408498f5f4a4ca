"""README.md is what a new user reads: small, points only at files of the repository, and every
command and config example in it works as printed (run on the smoke run, or as a dry run)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from closedloop import config, launch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def readme_commands() -> list[str]:
    lines = []
    for block in fenced(README.read_text(), "bash"):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command:
                lines.append(command)
    return lines


def test_readme_is_small_and_links_only_files_of_the_repository():
    assert README.stat().st_size <= 15_000
    for doc in DOCS:
        text = doc.read_text()
        assert "SPEC" not in text and "ASSETS" not in text and "shared folder" not in text, doc
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not target.startswith("http"):
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}, not in the repository"


def test_readme_names_the_keys_a_user_sets_and_the_default_model():
    text = README.read_text()
    for key in ("model.kind: hf", "model.name_or_path", "source: jsonl", "train_path", "heldout_path",
                "--profile slurm", "CLOSEDLOOP_LAUNCH_CONFIG", "report_to", "trainer_args", "Q4_1"):
        assert key in text, key


def test_readme_config_examples_validate(tmp_path):
    blocks = fenced(README.read_text(), "yaml")
    assert len(blocks) == 3
    for block in blocks:
        path = tmp_path / "example.yaml"
        path.write_text(block)
        if block.lstrip().startswith("# ~/mylab-slurm.yaml"):
            slurm = launch.load_settings([path]).slurm
            assert slurm.defaults.account == "mylab" and slurm.resources.sft.gpus_per_node == 8
        else:
            config.load([path])  # raises ConfigError naming the key if the example were wrong


@pytest.mark.slow
def test_every_readme_command_runs_as_printed(smoke_local_run):
    """On the smoke run's repository: `bash scripts/*.sh` must parse (they are the whole job and the
    whole suite), `snakemake` commands run as dry runs (`--report` on the smoke run), `closedloop`
    commands run, with results/default read as results/smoke (the experiment that ran)."""
    repo, run = smoke_local_run
    assert run.returncode == 0, run.stderr[-2000:]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    commands = readme_commands()
    assert any(c.startswith("snakemake") for c in commands) and any(c.startswith("closedloop") for c in commands)
    for command in commands:
        words = shlex.split(command.replace("results/default", "results/smoke"))
        if words[0] == "bash":
            assert words[1] in ("scripts/run.sh", "scripts/test.sh"), command
            checked = subprocess.run(["bash", "-n", ROOT / words[1]], capture_output=True, text=True)
        elif words[0] == "snakemake":
            extra = ["--configfile", "configs/smoke.yaml"] if "--report" in words else ["-n"]
            checked = subprocess.run([sys.executable, "-m", "snakemake", *extra, *words[1:]], cwd=repo, env=env,
                                     capture_output=True, text=True, timeout=600)
        else:
            assert words[0] == "closedloop", command
            checked = subprocess.run([sys.executable, "-m", "closedloop", *words[1:]], cwd=repo, env=env,
                                     capture_output=True, text=True, timeout=600)
        assert checked.returncode == 0, f"{command}: {(checked.stdout + checked.stderr)[-2000:]}"
