"""Record finished artifacts in DVC, from the stage that wrote them; push and pull runs.

Each stage records its own output once it is complete (``artifacts.artifact_dir`` calls
:func:`record` after the rename), so it works the same under local Snakemake, Slurm
or a bare ``closedloop run-stage``: one ``<artifact>.dvc`` file beside each artifact
under ``results/``; a data artifact re-adds its experiment's data directory
(``data/<experiment>.dvc``, :func:`closedloop.artifacts.dvc_unit`), and an artifact inside a
directory that DVC already tracks as a whole re-adds that directory instead. The cache links
(``cache.type`` in ``.dvc/config``: hardlink, symlink, copy), so it costs no second copy.

DVC's Python API is used, not the ``dvc`` command (0.1–0.4 s per add instead of
0.4–0.6 s per CLI call). Parallel jobs serialise on a file lock in ``.dvc/tmp/`` (DVC
itself edits shared ``.gitignore`` files and its own repo lock would otherwise make a
second job fail after 3 s).

Switch: ``CLOSEDLOOP_DVC=0`` never records; by default (``auto``) an artifact is recorded
when it lies inside a DVC repository and not otherwise (tests with temp dirs).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

ENV = "CLOSEDLOOP_DVC"
LOCK_NAME = "closedloop-record.lock"
LOCK_WAIT_S = 120.0


class DVCRecordError(RuntimeError):
    """An artifact could not be recorded in DVC (the message names it and why)."""


def enabled() -> bool:
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in ("auto", "1", "0", "on", "off", "true", "false"):
        raise DVCRecordError(f"environment variable {ENV}={value!r}: expected auto, 1 or 0")
    return value not in ("0", "off", "false")


def repo_root(path: Path) -> Path | None:
    """The DVC repository (the nearest ancestor holding a ``.dvc/`` dir) containing ``path``."""
    path = Path(path).resolve()
    for candidate in (path, *path.parents):
        if (candidate / ".dvc").is_dir():
            return candidate
    return None


def target_for(root: Path, path: Path) -> Path:
    """What to ``dvc add`` for ``path``: the nearest ancestor already tracked as a whole
    (``data/smoke`` when ``data/smoke.dvc`` exists), else ``path`` itself."""
    path = Path(path).resolve()
    for candidate in path.parents:
        if candidate == root or root not in candidate.parents:
            break
        if candidate.with_name(candidate.name + ".dvc").is_file():
            return candidate
    return path


@contextlib.contextmanager
def repo_lock(root: Path) -> Iterator[None]:
    """An exclusive lock over recording in the repo at ``root`` (parallel Snakemake jobs)."""
    lock_dir = root / ".dvc" / "tmp"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / LOCK_NAME, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _with_dvc_lock_retry(action):
    """Run ``action()``, retrying while another DVC process (``dvc`` CLI) holds DVC's own lock."""
    from dvc.lock import LockError

    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            return action()
        except LockError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def record(paths: Iterable[Path], shared: Iterable[Path] = ()) -> list[Path]:
    """``dvc add`` each path (or the tracked directory containing it); returns the targets.
    ``shared``: directories other jobs write into too (data/<experiment>): added, never checked out.

    Does nothing when recording is switched off or a path lies outside any DVC repo.
    """
    if not enabled():
        return []
    shared = {Path(p).resolve() for p in shared}
    by_root: dict[Path, list[Path]] = {}
    for path in paths:
        root = repo_root(path)
        if root is not None:
            target = target_for(root, path)
            if target != Path(path).resolve():  # an enclosing directory tracked as a whole
                shared.add(target)
            if target not in by_root.setdefault(root, []):
                by_root[root].append(target)
    for root, targets in by_root.items():
        _add(root, targets, shared)
    return [t for targets in by_root.values() for t in targets]


def _add(root: Path, targets: list[Path], shared: set[Path]) -> None:
    from dvc.dvcfile import FileIsGitIgnored
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    rel = [os.path.relpath(t, root) for t in targets]
    with repo_lock(root), contextlib.redirect_stdout(io.StringIO()):
        try:
            with Repo(str(root)) as repo:
                repo.scm_context.quiet = True  # no "to track the changes with git" hint per job
                _with_dvc_lock_retry(lambda: repo.add([str(t) for t in targets]))
                # add links only the files new to the cache; relink those it already held (a tokenizer
                # or an unchanged model shared with another artifact) so no payload stays a copy. Not for
                # a directory shared with other jobs (data/<experiment>): checkout would remove a sibling
                # renamed into it since the add
                own = [str(t) for t in targets if t not in shared]
                if own:
                    _with_dvc_lock_retry(lambda: repo.checkout(targets=own, relink=True))
        except FileIsGitIgnored as err:
            raise DVCRecordError(f"{root}: cannot record {rel} in DVC: {err} (un-ignore '*.dvc' files in "
                                 f".gitignore, or set {ENV}=0)") from err
        except DvcException as err:
            raise DVCRecordError(f"{root}: dvc add {' '.join(rel)} failed: {err} (set {ENV}=0 to skip)") from err


def write_views(path: Path, views: dict, log: Path | None = None) -> None:
    """Write a ``dvc.yaml`` with top-level ``metrics`` and ``plots`` (no stages) so that ``dvc
    metrics show|diff`` lists every metrics file and ``dvc plots show`` draws the training loss of
    every training log; ``views``: {"metrics": [paths], "training_logs": [paths]}, relative to the
    file's directory; ``log`` gets one line saying what was written."""
    import yaml

    loss = {"training_loss": {"x": "step", "y": {log: "loss" for log in views["training_logs"]},
                              "title": "training loss", "x_label": "step", "y_label": "loss"}}
    text = ("# Written by the DAG (rule dvc_views): DVC's own views of this experiment; no stages.\n"
            + yaml.safe_dump({"metrics": views["metrics"], "plots": [loss]}, sort_keys=False))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text(f"{path}: {len(views['metrics'])} metrics, {len(views['training_logs'])} training logs\n")


def push(root: Path, remote: str | None = None, jobs: int | None = None) -> int:
    """Push every DVC-tracked output of the repo at ``root`` to ``remote`` (default remote
    when None); returns the number of files transferred."""
    from dvc.repo import Repo

    with _one_line_errors("push", remote), Repo(str(root)) as repo:
        return repo.push(remote=remote, jobs=jobs)


def pull(root: Path, remote: str | None = None, jobs: int | None = None) -> dict:
    """Fetch and check out every DVC-tracked output of the repo at ``root``."""
    from dvc.repo import Repo

    with _one_line_errors("pull", remote), Repo(str(root)) as repo:
        return repo.pull(remote=remote, jobs=jobs)


@contextlib.contextmanager
def _one_line_errors(action: str, remote: str | None) -> Iterator[None]:
    """DVC's errors as one :class:`DVCRecordError` line naming what failed (never a traceback); DVC's
    own multi-line warnings (the missing cache files' hashes) are left out, the error names the outputs."""
    import logging

    from dvc.exceptions import CheckoutError, DvcException

    where = f"remote {remote!r}" if remote else "the default remote"
    loggers = [logging.getLogger(name) for name in ("dvc", "dvc_data")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    except CheckoutError as err:
        missing = sorted(str(t) for t in err.target_infos)
        raise DVCRecordError(
            f"dvc {action}: {len(missing)} tracked output(s) are neither in the cache nor on {where}: "
            f"{', '.join(missing)} (push them from the machine that ran them: closedloop lineage push; "
            "or rerun them: snakemake)") from None
    except DvcException as err:
        text = " ".join(str(err).split())
        raise DVCRecordError(f"dvc {action} with {where} failed: {text}") from None
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def status(root: Path) -> dict:
    """DVC's workspace status: empty when every tracked output matches its ``.dvc`` file."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.status()
