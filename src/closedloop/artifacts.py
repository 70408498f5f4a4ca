"""Atomic artifact writing and the provenance record saved beside every artifact.

A stage writes into a temporary sibling path; only when everything (payload, resolved
config, provenance) is written is it renamed into place, so a failed or killed stage
never leaves a half-written artifact that looks complete. Once in place, the artifact is
recorded in DVC when it lies in a DVC repository (:mod:`closedloop.dvc_store`).

The provenance record names the artifact's own content (``artifact``: path, sha256 and
one sha256 per file, relative to the record's directory) and, per input, its content
hash and the artifact that produced it, so ``closedloop lineage`` can walk back to the
data and re-hash everything (:mod:`closedloop.lineage`).
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
from closedloop import dvc_store

PROVENANCE = "provenance.json"
CONFIG = "config.yaml"
KEY_PACKAGES = ("closedloop", "torch", "transformers", "trl", "peft", "datasets", "omegaconf", "lm-eval")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(path: Path) -> dict[str, str]:
    """sha256 of every payload file of a directory, keyed by its relative POSIX path.

    The provenance and config files inside a directory, and hidden files (such as
    Snakemake's ``.snakemake_timestamp``), are left out: the hashes name the payload.
    """
    path = Path(path)
    hashes = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel in (PROVENANCE, CONFIG) or any(part.startswith(".") for part in Path(rel).parts):
            continue
        hashes[rel] = sha256_file(file)
    return hashes


def manifest_hash(hashes: dict[str, str]) -> str:
    """sha256 of a (relative path, file hash) list: the content hash of a directory."""
    digest = hashlib.sha256()
    for rel in sorted(hashes):
        digest.update(f"{rel}\0{hashes[rel]}\n".encode())
    return digest.hexdigest()


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a directory's (relative path, file hash) list (see :func:`file_hashes`)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such artifact")
    return manifest_hash(file_hashes(path))


def record_path(artifact: Path) -> Path | None:
    """The provenance file of an artifact: ``<dir>/provenance.json`` for a directory,
    ``<stem>.provenance.json`` beside a file (the report); None when there is none."""
    artifact = Path(artifact)
    candidates = [artifact / PROVENANCE]
    if artifact.name not in ("", ".", ".."):
        candidates.append(artifact.with_name(f"{artifact.stem}.{PROVENANCE}"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def producer_of(path: Path) -> Path | None:
    """The artifact that contains ``path`` (itself or its nearest ancestor with a record)."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if record_path(candidate) is not None:
            return candidate
    return None


def input_record(path: Path) -> dict:
    """An input's path and content hash, plus the artifact that produced it and that
    artifact's recorded hash (what ``closedloop lineage`` follows)."""
    record = {"path": str(path), "sha256": content_hash(Path(path))}
    source = producer_of(Path(path))
    if source is not None:
        produced = json.loads(record_path(source).read_text())
        record["artifact"] = str(source)
        record["artifact_stage"] = produced.get("stage")
        record["artifact_sha256"] = (produced.get("artifact") or {}).get("sha256")
    return record


def output_record(final: Path, files: dict[str, str], primary: str | None = None) -> dict:
    """The artifact's own content: ``files`` are relative to the provenance file's directory.

    ``sha256`` is the content hash of ``final`` (:func:`content_hash`): the hash of the
    file ``primary`` when the artifact is one file, else of the whole manifest.
    """
    sha = files[primary] if primary is not None else manifest_hash(files)
    return {"path": str(final), "sha256": sha, "files": files}


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


def _process_started() -> str:
    """When this process (the stage's job) started, to the millisecond; ``started`` in a record is
    when the stage began writing its artifact, often after the compute."""
    try:
        import psutil  # installed with accelerate

        created = psutil.Process().create_time()
    except ImportError:  # the time closedloop.artifacts was imported: close, a little late
        created = time.time()
    return datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds")


PROCESS_STARTED = _process_started()


def provenance(stage: str, view: dict, inputs: dict[str, Path], started: str, seed: int,
               output: dict | None = None) -> dict:
    """The record of SPEC §7: what produced an artifact, from what, with which code."""
    return {
        "stage": stage,
        "command": sys.argv,
        "config_hash": cl_config.config_hash(view),
        "artifact": output,
        "inputs": {name: input_record(Path(path)) for name, path in inputs.items()},
        "code": code_version(),
        "packages": package_versions(),
        "host": socket.gethostname(),
        "user": getpass.getuser(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "seed": seed,
        "process_started": PROCESS_STARTED,
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
        write_sidecars(tmp, stage, view, inputs, started, seed, output=output_record(final, file_hashes(tmp)))
        _replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dvc_store.record([final])


def write_sidecars(directory: Path, stage: str, view: dict, inputs: dict[str, Path], started: str, seed: int,
                   prefix: str = "", output: dict | None = None) -> None:
    """Write the resolved config and the provenance record (``<prefix>config.yaml`` etc.);
    ``output`` (:func:`output_record`) is the artifact's own content."""
    (directory / f"{prefix}{CONFIG}").write_text(cl_config.to_yaml(view))
    record = provenance(stage, view, inputs, started, seed, output)
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
