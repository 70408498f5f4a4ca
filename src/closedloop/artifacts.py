"""Atomic artifact writing and the provenance record saved beside every artifact.

A stage writes into a temporary sibling path; only when everything (payload, resolved
config, provenance) is written is it renamed into place, so a failed or killed stage
never leaves a half-written artifact that looks complete. Once in place, the artifact is
recorded in DVC when it lies in a DVC repository (:mod:`closedloop.dvc_store`).

The provenance record names the artifact's own content (``artifact``: path, sha256 and
one sha256 per file, relative to the record's directory) and, per input, its content
hash and the artifact that produced it, so ``closedloop lineage`` can walk back to the
data and re-hash everything (:mod:`closedloop.lineage`).

Longer than 400 lines: writing a record and checking an input against its producer's record
(:func:`check_inputs`) are one protocol, read together.
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
MARKERS = (".snakemake_timestamp",)
"""Files Snakemake writes into a finished output dir: not part of the content."""
KEY_PACKAGES = ("closedloop", "torch", "transformers", "trl", "peft", "datasets", "omegaconf", "lm-eval")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(path: Path, sha=None) -> dict[str, str]:
    """sha256 of every payload file of a directory, hidden ones included, keyed by its
    relative POSIX path (``sha``: the file hasher, :func:`sha256_file` by default).

    The provenance and config files at the top and Snakemake's markers (:data:`MARKERS`) are
    left out: the hashes name the payload, and a file slipped in, hidden or not, changes them.
    """
    path, sha = Path(path), sha or sha256_file
    hashes = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel in (PROVENANCE, CONFIG) or file.name in MARKERS:
            continue
        hashes[rel] = sha(file)
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
    return _digest(path, _hashes(path))


def _digest(path: Path, hashes: dict[str, str]) -> str:
    """The content hash of ``path`` from its :func:`_hashes`: a file's own, a directory's manifest."""
    return manifest_hash(hashes) if path.is_dir() else hashes[""]


_HASHES: dict[tuple, dict[str, str]] = {}
"""File hashes of this process by path and file stats (inode, size, mtime): a stage hashes each
input once (the check at its start and its provenance at the end share it) and again only when
it changed in between."""


def _hashes(path: Path) -> dict[str, str]:
    """``{"": sha256}`` of a file, :func:`file_hashes` of a directory; cached (:data:`_HASHES`)
    unless it is a pipe or device, whose content the stats do not pin."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif path.exists():
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such artifact")
    key = (os.path.abspath(path), *((str(f), s.st_ino, s.st_size, s.st_mtime_ns) for f in files for s in [f.stat()]))
    if key not in _HASHES or not (path.is_dir() or path.is_file()):
        _HASHES[key] = file_hashes(path) if path.is_dir() else {"": sha256_file(path)}
    return _HASHES[key]


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
    return _checked_input(Path(path), stage=None, name=None)


class StaleInputError(RuntimeError):
    """An input no longer matches the record of the artifact that produced it (one line: the
    file, the artifact and the command that rebuilds it)."""


def check_inputs(stage: str, inputs: dict[str, Path]) -> dict[str, dict]:
    """Compare every input with the record of the artifact that produced it (each hashed once,
    :data:`_HASHES`); returns the input records (:func:`input_record`) that the provenance keeps.

    Raises :class:`StaleInputError` when a file differs from, is missing from or was added to
    its producer's record (SPEC §7: nothing tampered is reused); inputs that no stage produced
    (a user's JSONL) are hashed and recorded, not checked."""
    return {name: _checked_input(Path(path), stage, name) for name, path in inputs.items()}


def _checked_input(path: Path, stage: str | None, name: str | None) -> dict:
    hashes = _hashes(path)
    record = {"path": str(path), "sha256": _digest(path, hashes)}
    source = producer_of(path)
    if source is None:
        return record
    produced = json.loads(record_path(source).read_text())
    record["artifact"] = str(source)
    record["artifact_stage"] = produced.get("stage")
    record["artifact_sha256"] = (produced.get("artifact") or {}).get("sha256")
    recorded = (produced.get("artifact") or {}).get("files")
    if stage is not None and recorded is not None:
        problem = _difference(path, record_path(source).parent, hashes, recorded)
        if problem:
            rule = produced.get("stage", "?")
            raise StaleInputError(
                f"{stage}: input '{name}' {problem} in artifact {source} [{rule}], so it is not what that stage "
                f"recorded: rebuild it with `snakemake --forcerun {rule}` (`closedloop lineage verify` lists "
                "every changed file)")
    return record


def inputs_key(inputs: dict[str, Path]) -> str:
    """sha256 over each input's name, path and the sha256 of its producer's provenance record
    (the record names the producer's content; an input without one: its own content hash).

    Part of every resumable work dir's name (:func:`closedloop.checkpoints.work_dir`, MCTS
    shards), so a job never resumes from state computed on other inputs (issue 15 §2)."""
    digest = hashlib.sha256()
    for name in sorted(inputs):
        path = Path(inputs[name])
        source = producer_of(path)
        sha = sha256_file(record_path(source)) if source is not None else content_hash(path)
        digest.update(f"{name}\0{path}\0{sha}\n".encode())
    return digest.hexdigest()


def _difference(path: Path, base: Path, hashes: dict[str, str], recorded: dict[str, str]) -> str | None:
    """The first file of ``path`` (an artifact, a directory or a file inside it, ``base`` its
    record's directory) that differs from, is missing from or is not in ``recorded``."""
    prefix = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
    prefix = "" if prefix == "." else Path(prefix).as_posix()
    inside = {rel: sha for rel, sha in recorded.items()
              if not prefix or rel == prefix or rel.startswith(prefix + "/")}
    for rel, sha in sorted(hashes.items()):
        full = "/".join(p for p in (prefix, rel) if p)
        if full not in inside:
            return f"{base / full} is not in the record"
        if inside.pop(full) != sha:
            return f"{base / full} changed (recorded sha256 {recorded[full][:12]}, now {sha[:12]})"
    for full, sha in sorted(inside.items()):
        return f"{base / full} is missing (recorded sha256 {sha[:12]})"
    return None


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


def base_model(view: dict) -> dict | None:
    """The identity of the base model the view's ``model`` (or ``vlm.model``) section names
    (:func:`closedloop.models.base_model_identity`: source, file, sha256, quantisation); None for a
    stage that loads no model (``data``, ``report``). Imports torch only for a stage that has a model."""
    section = view.get("model") or (view.get("vlm") or {}).get("model")
    if not section:
        return None
    from closedloop import models

    return models.base_model_identity(section)


def provenance(stage: str, view: dict, inputs: dict[str, Path], started: str, seed: int,
               output: dict | None = None) -> dict:
    """The record of SPEC §7: what produced an artifact, from what, with which code."""
    return {
        "stage": stage,
        "command": sys.argv,
        "config_hash": cl_config.config_hash(view),
        "base_model": base_model(view),
        "artifact": output,
        "inputs": check_inputs(stage, inputs),
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_tmp(final: Path) -> list[Path]:
    """Remove the temporary siblings of ``final`` (``.<name>.tmp-<host>-<pid>-<time>`` of
    :func:`artifact_dir`, ``.<name>.tmp-<pid>`` of :func:`atomic_file`, ``.<name>.old-<pid>`` of
    a replace) whose process is gone: a killed job's partial output (a model, for a training stage)
    never outlives the next start of that stage. Only this host's dead processes are judged; a
    sibling of another host (a Slurm node) is left alone. Returns what was removed."""
    final, host, removed = Path(final), socket.gethostname(), []
    name = "".join(f"[{c}]" if c in "*?[" else c for c in final.name)  # glob-escaped
    for stale in sorted([*final.parent.glob(f".{name}.tmp-*"), *final.parent.glob(f".{name}.old-*")]):
        kind, _, suffix = stale.name.removeprefix(f".{final.name}.").partition("-")
        parts = suffix.rsplit("-", 2)
        owner, pid = (parts[0], parts[1]) if kind == "tmp" and len(parts) == 3 else (host, parts[0])
        if kind not in ("tmp", "old") or owner != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        print(f"artifacts: removed {stale} (left by process {pid}, which is gone)", flush=True)
        removed.append(stale)
    return removed


@contextlib.contextmanager
def artifact_dir(final: Path, stage: str, view: dict, inputs: dict[str, Path], seed: int) -> Iterator[Path]:
    """Yield a temporary directory; on success add config + provenance and rename it to ``final``.

    Temporary dirs of earlier jobs that died are removed first (:func:`remove_stale_tmp`). On a
    rank other than 0 of a distributed job the directory is thrown away instead."""
    final = Path(final)
    check_inputs(stage, inputs)  # before any work: refuse an input that is no longer what was recorded
    final.parent.mkdir(parents=True, exist_ok=True)
    started = now()
    if int(os.environ.get("RANK", "0")) == 0:
        remove_stale_tmp(final)
    tmp = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{int(time.time())}")
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
    unit = dvc_unit(final, view)
    dvc_store.record([unit], shared=[unit] if unit != final else [])


def dvc_unit(final: Path, view: dict) -> Path:
    """What DVC tracks for ``final``: a data artifact goes with its experiment's whole data dir
    (``data/<experiment>.dvc``, so experiments never rewrite each other's ``.dvc`` file), any other
    artifact by itself."""
    if "data_dir" in view and "experiment" in view:
        root = Path(view["data_dir"]) / view["experiment"]
        if Path(os.path.abspath(root)) in Path(os.path.abspath(final)).parents:
            return root
    return final


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
