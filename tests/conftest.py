import os
import shutil
import subprocess
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


@pytest.fixture
def repo_copy(tmp_path):
    """A copy of the project's tracked files in a fresh git + DVC repo."""
    dest = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest
