"""Atomic artifact writing and the provenance record saved beside every artifact.

A stage writes into a temporary sibling path; only when everything (payload, resolved
config, provenance) is written is it renamed into place, so a failed or killed stage
never leaves a half-written artifact that looks complete.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from closedloop import config as cl_config

PROVENANCE = "provenance.json"
CONFIG = "config.yaml"
KEY_PACKAGES = ("closedloop", "torch", "transformers", "trl", "peft", "datasets", "omegaconf")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a directory's (relative path, file hash) list.

    The provenance and config files inside a directory, and hidden files (such as
    Snakemake's ``.snakemake_timestamp``), are left out: the hash names the payload.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such artifact")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel in (PROVENANCE, CONFIG) or any(part.startswith(".") for part in Path(rel).parts):
            continue
        digest.update(f"{rel}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> dict:
    commit = _git("rev-parse", "HEAD")
    dirty = None
    if commit is not None:
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", "src", "rules", "Snakefile"))
    return {"git_commit": commit, "dirty": dirty}


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance(stage: str, view: dict, inputs: dict[str, Path], started: str, seed: int) -> dict:
    """The record of SPEC §7: what produced an artifact, from what, with which code."""
    return {
        "stage": stage,
        "command": sys.argv,
        "config_hash": cl_config.config_hash(view),
        "inputs": {
            name: {"path": str(path), "sha256": content_hash(Path(path))}
            for name, path in inputs.items()
        },
        "code": code_version(),
        "packages": package_versions(),
        "host": socket.gethostname(),
        "user": getpass.getuser(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "seed": seed,
        "started": started,
        "finished": now(),
    }


def _replace(tmp: Path, final: Path) -> None:
    """Move ``tmp`` onto ``final``; an old ``final`` is moved aside first, then removed."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def artifact_dir(final: Path, stage: str, view: dict, inputs: dict[str, Path], seed: int) -> Iterator[Path]:
    """Yield a temporary directory; on success add config + provenance and rename it to ``final``.

    On a rank other than 0 of a distributed job the directory is thrown away instead."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    started = now()
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{int(time.time())}")
    tmp.mkdir()
    if int(os.environ.get("RANK", "0")) != 0:  # torch.distributed: only rank 0 publishes the artifact
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        yield tmp
        write_sidecars(tmp, stage, view, inputs, started, seed)
        _replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_sidecars(directory: Path, stage: str, view: dict, inputs: dict[str, Path], started: str, seed: int,
                   prefix: str = "") -> None:
    """Write the resolved config and the provenance record (``<prefix>config.yaml`` etc.)."""
    (directory / f"{prefix}{CONFIG}").write_text(cl_config.to_yaml(view))
    record = provenance(stage, view, inputs, started, seed)
    (directory / f"{prefix}{PROVENANCE}").write_text(json.dumps(record, indent=2) + "\n")


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "w") -> Iterator:
    """Open a temporary sibling of ``final`` for writing; rename it into place on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as fh:
            yield fh
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(fh, rows) -> None:
    for row in rows:
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
