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
Generated tokens are counted for every decoding, so budgets can be matched. Writes
``predictions.jsonl`` and ``metrics.json`` with accuracy, n and a bootstrap CI, and the
model and data artifacts it used.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import set_seed

from closedloop import answers, artifacts, beam, generation, models, paths, prompts, stats
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


def evaluate(cfg, tag: str, task: str, ev, rows: list[dict], out_dir: Path, view: dict, stage: str,
             family: FamilyDecoding | None = None) -> None:
    """Decode ``rows`` with model ``tag`` under ``ev`` (or ``family``'s own decoding) and write
    predictions + metrics to ``out_dir``."""
    data = paths.data_dir(cfg, task)
    if family is None:
        source, model_info = model_record(cfg, tag)
    else:
        source, model_info = str(family.model_dir), {"tag": tag, "path": str(family.model_dir)}
    inputs = {"data": data}
    if family is not None or paths.model_dir(cfg, tag) is not None:
        inputs["model"] = Path(source)
    artifacts.check_inputs(stage, inputs)  # before decoding: never evaluate a changed model or split
    if family is None:
        model, tokenizer = models.load_dir(source, cfg.model, inference=True)
        set_seed(cfg.seed)
        completions, n_tokens = decode(model, tokenizer, rows, ev, cfg.seed, f"{stage} {tag}/{task}")
        decoding, extra = ev.decoding.value, {"dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    else:
        set_seed(cfg.seed)
        completions, n_tokens, extra = family.decode(rows, f"{stage} {tag}/{task} {family.name}")
        decoding = family.name
    records, acc, any_ok = score(rows, completions)
    split = split_name(ev)
    metrics = {"task": task, "split": split, "model": model_info, "decoding": decoding,
               "dtype": extra.pop("dtype"),
               "k": ev.k if decoding in ("sampled", "self_consistency") else 1,
               "temperature": 0.0 if decoding in ("greedy", "coral_blockwise") else ev.temperature,
               "seed": cfg.seed, "generated_tokens": n_tokens,
               "generated_tokens_per_question": n_tokens / max(len(rows), 1),
               "data": {"path": str(data), "sha256": artifacts.content_hash(data / f"{split}.jsonl")},
               **stats.summarise(acc, ev.n_bootstrap, ev.ci_level, cfg.seed), **extra}
    if decoding == "beam_self_eval":
        metrics["beam"] = {key: ev[f"beam_{key}"] for key in ("k", "n", "lambda", "tau", "tau_decay", "max_steps",
                                                               "temperature", "step_tokens")}
    if decoding == "sampled":
        metrics["pass_at_k"] = stats.summarise(any_ok, ev.n_bootstrap, ev.ci_level, cfg.seed)
    with artifacts.artifact_dir(out_dir, stage, view, inputs, cfg.seed) as out:
        with open(out / "predictions.jsonl", "w") as fh:
            artifacts.write_jsonl(fh, records)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"{stage}: {tag}/{task} {decoding}: accuracy {metrics['accuracy']:.3f} "
          f"[{metrics['ci_low']:.3f}, {metrics['ci_high']:.3f}] n={metrics['n']}, {n_tokens} generated tokens")
