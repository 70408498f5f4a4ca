import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _offline_env():
    """Tests never reach a model hub; converted models are cached across runs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture
def smoke_cfg(tmp_path):
    """The smoke config with data/ and results/ inside a temp dir."""
    from closedloop import config

    return config.load([ROOT / "configs" / "smoke.yaml"],
                       [f"data_dir={tmp_path / 'data'}", f"results_dir={tmp_path / 'results'}"])


def copy_repo(dest: Path) -> Path:
    """Copy the project's tracked files (symlinks as symlinks) into a fresh git repo at ``dest``."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_symlink():  # ./slurm -> workflow/profiles/slurm (`snakemake --profile slurm`)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(ROOT / rel), dest / rel)
        elif (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


@pytest.fixture
def repo_copy(tmp_path):
    """A copy of the project's tracked files in a fresh git + DVC repo."""
    return copy_repo(tmp_path / "repo")


SMOKE_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def smoke_local_run(tmp_path_factory):
    """The smoke DAG run once locally (``snakemake --cores 2``) in a repo copy: (repo, completed process).

    Shared by the DAG test and the Slurm test, which compares its outputs with these."""
    repo = copy_repo(tmp_path_factory.mktemp("smoke_local") / "repo")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("CLOSEDLOOP_LAUNCH_CONFIG", None)
    env.pop("CLOSEDLOOP_LAUNCHER", None)
    run = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "configs/smoke.yaml"],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    return repo, run
