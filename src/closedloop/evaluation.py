"""Evaluation (SPEC §7): decode a model on a split and score it; the stages ``evaluate``
and ``evaluate_decoding`` call :func:`evaluate`.

Decoding: ``greedy`` (one completion, through the continuous-batching decode loop of
:mod:`closedloop.decode`, ``batch_size`` rows at a time); ``sampled`` (``k`` completions at the configured
temperature: accuracy is the mean per-sample correctness, ``pass_at_k`` whether any
sample is right); ``self_consistency`` (majority vote over ``k`` samples);
``beam_self_eval`` (SPEC §1 self-evaluation guided beam search, :mod:`closedloop.beam`).
A family with its own model and decoding (COrAL's ``coral_blockwise``, SPEC §5) hands
:func:`evaluate` a :class:`FamilyDecoding`; its extra metrics (forward passes, tokens per
forward, wall time) are recorded beside accuracy.
Generated tokens are counted for every decoding, so budgets can be matched. Every
generative score reports its invalid-answer rate: the share of completions from which no
answer could be extracted (a format failure, scored wrong).

Scoring (:func:`scoring`, stage ``evaluate``): multiple-choice tasks by the log-likelihood of
each choice through lm-evaluation-harness (``eval.mc_scoring: loglikelihood``, acc and
acc_norm, :mod:`closedloop.harness`) or by generating and reading the letter
(``generate``); GSM8K and MATH by the harness's extraction (``eval.math_scoring: harness``)
or ours (``ours``); the synthetic task and user JSONL tasks always by ours. The decoding
comparison (stage ``evaluate_decoding``) always generates.

Writes ``predictions.jsonl`` and ``metrics.json`` with accuracy, n and a bootstrap CI, and
the model and data artifacts it used.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import set_seed

from closedloop import answers, artifacts, beam, generation, harness, models, paths, prompts, stats
from closedloop import config as cl_config
from closedloop import decode as decode_loop


def model_record(cfg, tag: str) -> tuple[str, dict]:
    """Where model ``tag`` loads from, and what to record about it."""
    trained = paths.model_dir(cfg, tag)
    if trained is not None:
        return str(trained), {"tag": tag, "path": str(trained)}
    source = models.base_source(cfg.model)
    record = {"tag": tag, "kind": str(cfg.model.kind.value), "source": source, "revision": cfg.model.revision}
    if Path(source).is_dir():
        record["sha256"] = artifacts.content_hash(Path(source))
    return source, record


@dataclass
class FamilyDecoding:
    """A family's own model and decoding for :func:`evaluate` (shared code imports no family).

    ``decode(rows, desc)`` loads the model from ``model_dir`` itself and returns the
    completions per row, the generated-token count and extra metrics (``dtype`` among them)."""

    name: str
    """Recorded as ``metrics["decoding"]``."""
    model_dir: Path
    decode: Callable[[list[dict], str], tuple[list[list[str]], int, dict]]


def invalid_rate(extracted: list[list]) -> float:
    """The share of completions whose answer could not be extracted (None or the harness's "[invalid]")."""
    flat = [e for row in extracted for e in row]
    return sum(e is None or e == harness.INVALID for e in flat) / len(flat) if flat else float("nan")


def score(rows: list[dict], completions: list[list[str]]) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Per-row predictions, per-row accuracy (mean over samples) and per-row pass@k."""
    records, acc, any_ok = [], [], []
    for row, texts in zip(rows, completions, strict=True):
        extracted = [answers.extract(t, row) for t in texts]
        correct = [answers.is_correct(e, row) for e in extracted]
        records.append({"id": row["id"], "answer": row["answer"], "completions": texts,
                        "extracted": extracted, "correct": correct})
        acc.append(float(np.mean(correct)))
        any_ok.append(float(any(correct)))
    return records, np.array(acc), np.array(any_ok)


def decode(model, tokenizer, rows: list[dict], ev, seed: int, desc: str) -> tuple[list[list[str]], int]:
    """Completions per row under ``eval.decoding``, and the number of tokens generated."""
    mode = ev.decoding.value
    mc = bool(rows) and bool(rows[0].get("choices"))
    if mode == "coral_blockwise":
        raise cl_config.ConfigError("key 'eval.decoding': coral_blockwise decodes a COrAL model (SPEC §5); its "
                                    "evaluations are the coral_evaluate jobs of `snakemake coral_all`")
    if mode == "beam_self_eval":
        texts, n_tokens = beam.beam_search(
            model, tokenizer, rows, k=ev.beam_k, n=ev.beam_n, lam=ev.beam_lambda, tau=ev.beam_tau,
            tau_decay=ev.beam_tau_decay, max_steps=1 if mc else ev.beam_max_steps,
            temperature=ev.beam_temperature, max_step_tokens=ev.beam_step_tokens,
            batch_size=ev.batch_size * ev.beam_n, seed=seed)
        return [[t] for t in texts], n_tokens
    texts = [prompts.chat_prompt(tokenizer, r) for r in rows]
    budget = ev.mc_max_new_tokens if mc else ev.max_new_tokens
    if mode == "greedy":
        return decode_loop.greedy_generate(model, tokenizer, texts, max_new_tokens=budget, max_rows=ev.batch_size,
                                           stop_at_answer=not mc, desc=desc)
    completions, n_tokens = generation.generate(  # sampled / self_consistency: k samples a question
        model, tokenizer, texts, max_new_tokens=budget, batch_size=ev.batch_size, do_sample=True,
        temperature=ev.temperature, top_p=ev.top_p, num_return_sequences=ev.k, stop_at_answer=not mc, desc=desc,
    )
    if mode == "self_consistency":
        completions = [[beam.majority_vote(c, r)] for c, r in zip(completions, rows, strict=True)]
    return completions, n_tokens


def split_name(ev) -> str:
    return cl_config.enum_value(ev.split)


def split_rows(cfg, task: str, ev) -> list[dict]:
    """The rows of ``ev.split`` (held-out by default; validation for choosing settings)."""
    path = paths.data_dir(cfg, task) / f"{split_name(ev)}.jsonl"
    rows = artifacts.read_jsonl(path) if path.exists() else []
    if not rows:
        raise cl_config.ConfigError(f"key 'eval.split': {path} has no rows (for validation set "
                                    f"data.tasks.{task}.n_validation > 0)")
    return rows


def scoring(cfg, task: str, ev, rows: list[dict]) -> str:
    """How stage ``evaluate`` scores ``task``: ``loglikelihood`` (multiple choice through the
    harness), ``harness`` (GSM8K/MATH generated and extracted by the harness) or
    ``generate`` (our decoding and extraction)."""
    if rows and rows[0].get("choices"):
        return cl_config.enum_value(ev.mc_scoring)
    source = cl_config.enum_value(cfg.data.tasks[task].source)
    if source in ("gsm8k", "math") and cl_config.enum_value(ev.math_scoring) == "harness":
        return "harness"
    return "generate"


def run_harness(model, tokenizer, cfg, task: str, ev, rows: list[dict], mode: str) -> tuple[list[dict], dict]:
    """Predictions and metrics of one task through lm-evaluation-harness (:mod:`closedloop.harness`)."""
    import lm_eval

    split_file = paths.data_dir(cfg, task) / f"{split_name(ev)}.jsonl"
    source = cl_config.enum_value(cfg.data.tasks[task].source)
    config = harness.task_config(task, source, split_file, rows, ev.max_new_tokens)
    samples = harness.run(harness.wrap(model, tokenizer, ev.batch_size), config)

    def summary(ok: list[bool]) -> dict:
        return stats.summarise(np.array(ok, dtype=float), ev.n_bootstrap, ev.ci_level, cfg.seed)

    info = {"harness": {"lm_eval": lm_eval.__version__, "prompt": config["doc_to_text"], "num_fewshot": 0}}
    if mode == "loglikelihood":
        records = harness.mc_records(samples)
        metrics = {**info, "decoding": "loglikelihood", "k": 1, "temperature": 0.0, "generated_tokens": 0,
                   "generated_tokens_per_question": 0.0, **summary([r["correct"][0] for r in records])}
        if all("correct_norm" in r for r in records):
            metrics["acc_norm"] = summary([r["correct_norm"] for r in records])
        return records, metrics
    records, filters = harness.generative_records(samples)
    by_filter = {}
    for name in filters:
        extracted = [[r["filters"][name]["extracted"]] for r in records]
        if source == "math":  # the hendrycks rule reads the text between the first and last "$"
            extracted = [[c if c.count("$") >= 2 else None] for r in records for c in r["completions"]]
        by_filter[name] = {**summary([r["filters"][name]["correct"] for r in records]),
                           "invalid_rate": invalid_rate(extracted)}
    first = by_filter[filters[0]]
    metrics = {**info, "decoding": "greedy", "k": 1, "temperature": 0.0, "generated_tokens": None,
               "generated_tokens_per_question": None, "filter": filters[0], "filters": by_filter,
               "invalid_rate": first["invalid_rate"],
               **{k: first[k] for k in ("accuracy", "ci_low", "ci_high", "ci_level", "n")}}
    return records, metrics


def evaluate(cfg, tag: str, task: str, ev, rows: list[dict], out_dir: Path, view: dict, stage: str,
             mode: str = "generate", family: FamilyDecoding | None = None) -> None:
    """Score model ``tag`` on ``rows`` under ``ev`` (``mode``: :func:`scoring`), or decode them with
    ``family``'s own model and decoding, and write predictions + metrics to ``out_dir``."""
    data = paths.data_dir(cfg, task)
    if family is None:
        source, model_info = model_record(cfg, tag)
    else:
        source, model_info = str(family.model_dir), {"tag": tag, "path": str(family.model_dir)}
    inputs = {"data": data}
    if family is not None or paths.model_dir(cfg, tag) is not None:
        inputs["model"] = Path(source)
    artifacts.check_inputs(stage, inputs)  # before decoding: never evaluate a changed model or split
    split = split_name(ev)
    common = {"task": task, "split": split, "model": model_info, "scoring": mode, "seed": cfg.seed,
              "data": {"path": str(data), "sha256": artifacts.content_hash(data / f"{split}.jsonl")}}
    if family is None:
        model, tokenizer = models.load_dir(source, cfg.model, inference=True)
        weights = next(model.parameters())
        common["dtype"], common["device"] = str(weights.dtype).removeprefix("torch."), weights.device.type
        set_seed(cfg.seed)
        if mode != "generate":
            records, metrics = run_harness(model, tokenizer, cfg, task, ev, rows, mode)
            write_eval(out_dir, stage, view, cfg, tag, inputs, records, {**common, **metrics})
            return
        completions, n_tokens = decode(model, tokenizer, rows, ev, cfg.seed, f"{stage} {tag}/{task}")
        decoding, extra = ev.decoding.value, {}
    else:
        set_seed(cfg.seed)
        completions, n_tokens, extra = family.decode(rows, f"{stage} {tag}/{task} {family.name}")
        common["dtype"] = extra.pop("dtype")
        decoding = family.name
    records, acc, any_ok = score(rows, completions)
    metrics = {**common, "decoding": decoding,
               "k": ev.k if decoding in ("sampled", "self_consistency") else 1,
               "temperature": 0.0 if decoding in ("greedy", "coral_blockwise") else ev.temperature,
               "generated_tokens": n_tokens,
               "generated_tokens_per_question": n_tokens / max(len(rows), 1),
               "invalid_rate": invalid_rate([r["extracted"] for r in records]),
               **stats.summarise(acc, ev.n_bootstrap, ev.ci_level, cfg.seed), **extra}
    if decoding == "beam_self_eval":
        metrics["beam"] = {key: ev[f"beam_{key}"] for key in ("k", "n", "lambda", "tau", "tau_decay", "max_steps",
                                                               "temperature", "step_tokens")}
    if decoding == "sampled":
        metrics["pass_at_k"] = stats.summarise(any_ok, ev.n_bootstrap, ev.ci_level, cfg.seed)
    write_eval(out_dir, stage, view, cfg, tag, inputs, records, metrics)


def write_eval(out_dir: Path, stage: str, view: dict, cfg, tag: str, inputs: dict[str, Path],
               records: list[dict], metrics: dict) -> None:
    """predictions.jsonl and metrics.json as one artifact."""
    with artifacts.artifact_dir(out_dir, stage, view, inputs, cfg.seed) as out:
        with open(out / "predictions.jsonl", "w") as fh:
            artifacts.write_jsonl(fh, records)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    invalid = metrics.get("invalid_rate")
    print(f"{stage}: {tag}/{metrics['task']} {metrics['scoring']}/{metrics['decoding']}: accuracy "
          f"{metrics['accuracy']:.3f} [{metrics['ci_low']:.3f}, {metrics['ci_high']:.3f}] n={metrics['n']}"
          + (f", invalid {invalid:.3f}" if invalid is not None else "")
          + (f", acc_norm {metrics['acc_norm']['accuracy']:.3f}" if "acc_norm" in metrics else ""))
