"""POPE-style object-presence evaluation of the branch's LLaVAs (SPEC §4): generation,
answer parsing, scores with CIs, and the branch report's tables (stages ``pope`` and
``vlm_report``).

Answer rule (``vlm.pope.answer_rule``): ``official`` (default) is POPE's own
``evaluate.py`` (AoiDragon/POPE f3ec604, identical in LLaVA's ``eval_pope.py``): keep the text
before the first ".", delete commas, split on single spaces; the exact word ``No``, ``no`` or
``not`` ⇒ no, anything else (including "NO", "Not sure" and an empty answer) ⇒ yes.
``lenient`` is this project's earlier rule: the first sentence, lower-cased, split on anything
but letters, the word "no" or "not" ⇒ no. "yes" is the positive class: accuracy, precision,
recall, F1 and the yes-ratio, overall and per POPE split (random / popular / adversarial), each with a
percentile bootstrap CI over questions (:func:`closedloop.stats.bootstrap_metric`).

Output ``results/<experiment>/vlm/pope/<tag>/``: ``predictions.jsonl`` (question, label,
generation, parsed answer) and ``metrics.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from closedloop import artifacts, paths, stats
from closedloop.vlm import grounding
from closedloop.vlm import model as vlm
from closedloop.vlm.scenes import SPLITS, load_rgb

METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


ANSWER_RULES = ("official", "lenient")


def parse_answer(text: str, rule: str = "official") -> str:
    """"yes" or "no" for one generation under ``rule`` (module docstring; SPEC §4)."""
    if rule == "official":  # POPE evaluate.py / LLaVA eval_pope.py, verbatim in effect
        if text.find(".") != -1:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        return "no" if ("No" in words or "not" in words or "no" in words) else "yes"
    if rule != "lenient":
        raise ValueError(f"key 'vlm.pope.answer_rule': expected one of {list(ANSWER_RULES)}, got {rule!r}")
    first = text.strip().split(".")[0]
    words = re.findall(r"[a-z']+", first.lower().replace(",", " "))
    return "no" if ("no" in words or "not" in words) else "yes"


def confusion(labels: list[str], answers: list[str]) -> dict[str, int]:
    """TP/FP/TN/FN with "yes" as the positive class."""
    pairs = list(zip(labels, answers, strict=True))
    return {"tp": sum(lab == "yes" and a == "yes" for lab, a in pairs),
            "fp": sum(lab == "no" and a == "yes" for lab, a in pairs),
            "tn": sum(lab == "no" and a == "no" for lab, a in pairs),
            "fn": sum(lab == "yes" and a == "no" for lab, a in pairs)}


def metrics_from_confusion(c: dict[str, int]) -> dict[str, float]:
    """Accuracy, precision, recall, F1, yes-ratio; an undefined ratio (0/0) is 0, as in POPE's script."""
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else float("nan"), "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": (tp + fp) / n if n else float("nan")}


def _vectorised(label_yes: np.ndarray, answer_yes: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The five metrics for each bootstrap resample (rows of ``idx``)."""
    lab, ans = label_yes[idx], answer_yes[idx]
    tp = (lab & ans).sum(1)
    fp = (~lab & ans).sum(1)
    tn = (~lab & ~ans).sum(1)
    fn = (lab & ~ans).sum(1)
    n = idx.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.where(precision + recall > 0,
                                                                              precision + recall, 1), 0.0)
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n}


def score(labels: list[str], answers: list[str], n_boot: int, level: float, seed: int) -> dict:
    """Point metrics, confusion counts and a bootstrap CI per metric for one set of questions."""
    c = confusion(labels, answers)
    point = metrics_from_confusion(c)
    lab = np.array([x == "yes" for x in labels])
    ans = np.array([x == "yes" for x in answers])
    cis = stats.bootstrap_metric(lambda idx: _vectorised(lab, ans, idx), len(labels), METRICS, n_boot, level, seed)
    return {"n": len(labels), "confusion": c, **point,
            "ci": {m: list(cis[m]) for m in METRICS}, "ci_level": level}


@torch.no_grad()
def generate(model, processor, rows: list[dict], data: Path, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers, batched, left-padded."""
    processor.tokenizer.padding_side = "left"
    texts = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = processor(images=[load_rgb(data / r["image"]) for r in chunk],
                          text=[vlm.prompt(r["question"]) for r in chunk], return_tensors="pt", padding=True)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        texts += processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip() for t in texts]


def pope_metrics(cfg, tag: str, source: Path, data: Path, rows: list[dict], generations: list[str]) -> dict:
    """metrics.json: overall and per-split scores of one model's generations."""
    p = cfg.vlm.pope
    answers = [parse_answer(g, p.answer_rule) for g in generations]
    labels = [r["label"] for r in rows]
    metrics = {"model": {"tag": tag, "path": str(source)}, "seed": cfg.seed, "decoding": "greedy",
               "answer_rule": p.answer_rule,
               "data": {"path": str(data), "sha256": artifacts.content_hash(data / "pope.jsonl")},
               "all": score(labels, answers, p.n_bootstrap, p.ci_level, cfg.seed), "splits": {}}
    for split in SPLITS:
        idx = [i for i, r in enumerate(rows) if r["split"] == split]
        metrics["splits"][split] = score([labels[i] for i in idx], [answers[i] for i in idx], p.n_bootstrap,
                                         p.ci_level, cfg.seed)
    return metrics


def _fmt(m: dict, key: str) -> str:
    low, high = m["ci"][key]
    return f"{100 * m[key]:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _seconds(path: Path) -> str:
    """Wall time of a stage from its provenance record."""
    from datetime import datetime

    try:
        prov = json.loads((path / artifacts.PROVENANCE).read_text())
        took = datetime.fromisoformat(prov["finished"]) - datetime.fromisoformat(prov["started"])
        return f"{took.total_seconds():.0f}"
    except (OSError, KeyError, ValueError):
        return "?"


def grounding_lines(sft_stats: Path) -> list[str]:
    """The report's section on ``vlm_sft``'s grounding check (:mod:`closedloop.vlm.grounding`),
    a loud warning first when it failed; none when the stage did not run it."""
    sft = json.loads(sft_stats.read_text()) if sft_stats.is_file() else {}
    record = sft.get("grounding")
    if record is None:
        return []
    lines = [""]
    if (text := grounding.warning(record)) is not None:
        lines += [f"> **{text}**", ""]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}"

    lines += [f"Grounding check of the SFT model (presence questions asked on an image where the answer is yes "
              f"and on one where it is no; validation scenes): pass if ≥ {100 * record['threshold']:.0f}% of "
              f"the answers flip with the image: **{'passed' if record['passed'] else 'FAILED'}**.", "",
              "| probes | pairs | answer flips with the image | both right | accuracy | yes-ratio |",
              "|---|---|---|---|---|---|"]
    for name, r in [("all", record), *record["kinds"].items()]:
        lines.append(f"| {name} | {r['n_pairs']} | {pct(r['flip_rate'])} | {pct(r['pair_accuracy'])} | "
                     f"{pct(r['accuracy'])} | {pct(r['yes_ratio'])} |")
    sq, vision = record.get("scene_questions") or {}, sft.get("vision_heldout") or {}
    lines += ["", f"Same validation scenes: SFT model on \"What shape is in the image?\" {pct(sq.get('what_shape'))}%, "
                  f"\"What color is the shape?\" {pct(sq.get('what_color'))}%; vision tower + heads before SFT: "
                  f"shape {pct(vision.get('shape_acc'))}%, colour {pct(vision.get('color_acc'))}%."]
    attempts = sft.get("attempts") or []
    if len(attempts) > 1:  # vlm.sft.restart_below
        lines += ["", f"SFT was restarted {len(attempts) - 1} time(s) with a new seed (validation accuracy below "
                      f"vlm.sft.restart_below); kept attempt {sft['kept_attempt']}: "
                  + ", ".join(f"seed {a['seed']} {pct(a['validation']['accuracy'])}%" for a in attempts) + "."]
    return lines


def render_report(cfg) -> str:
    """The branch report: POPE table (all and per split, with CIs), the SFT model's grounding
    check (with a loud warning when it failed), the γ selection, time per stage."""
    tags = list(cfg.vlm.pope.models)
    results = {t: json.loads((paths.pope_dir(cfg, t) / "metrics.json").read_text()) for t in tags}
    level = int(100 * cfg.vlm.pope.ci_level)
    lines = ["# V-DPO branch (SPEC §4): POPE-style evaluation on easy-VQA", "",
             f"Held-out easy-VQA test images; yes/no object-presence questions, balanced yes/no per split; "
             f"values in %, [{level}% bootstrap CI]. POPE itself (COCO) is not available offline: this is a stand-in.",
             "", "| model | F1 | accuracy | precision | recall | yes-ratio | n |", "|---|---|---|---|---|---|---|"]
    for t, m in results.items():
        a = m["all"]
        lines.append(f"| {t} | {_fmt(a, 'f1')} | {_fmt(a, 'accuracy')} | {_fmt(a, 'precision')} | "
                     f"{_fmt(a, 'recall')} | {_fmt(a, 'yes_ratio')} | {a['n']} |")
    lines += ["", "F1 per negative type:", "", "| model | " + " | ".join(SPLITS) + " |",
              "|---|" + "---|" * len(SPLITS)]
    for t, m in results.items():
        lines.append(f"| {t} | " + " | ".join(_fmt(m["splits"][s], "f1") for s in SPLITS) + " |")
    lines += grounding_lines(paths.vlm_sft_dir(cfg) / "stats.json")
    selection = paths.vdpo_dir(cfg, "vdpo") / "gamma_selection.json" if "vdpo" in tags else None
    if selection is not None and selection.is_file():
        sel = json.loads(selection.read_text())
        lines += ["", f"V-DPO γ, chosen on the validation questions (training-split images, never the held-out "
                      f"set) by {sel['criterion']}; chosen γ = {sel['chosen']:g}:", "",
                  "| γ | val accuracy | val F1 | val yes-ratio | n |", "|---|---|---|---|---|"]
        if "sft" in sel:  # the SFT model on the same questions
            v = sel["sft"]
            lines.append(f"| SFT | {100 * v['accuracy']:.1f} | {100 * v['f1']:.1f} | {100 * v['yes_ratio']:.1f} | {v['n']} |")
        lines += [f"| {r['gamma']:g} | {100 * r['val']['accuracy']:.1f} | {100 * r['val']['f1']:.1f} | "
                  f"{100 * r['val']['yes_ratio']:.1f} | {r['val']['n']} |" for r in sel["table"]]
        chosen = next(r for r in sel["table"] if r["gamma"] == sel["chosen"])
        if "sft" in sel and chosen["val"]["accuracy"] < sel["sft"]["accuracy"] - 0.02:
            lines += ["", f"> **WARNING: V-DPO's validation accuracy ({100 * chosen['val']['accuracy']:.1f}) is more "
                          f"than 2 points below the SFT model's ({100 * sel['sft']['accuracy']:.1f}): the preference "
                          "step made the model worse on the validation questions (lower vlm.vdpo.learning_rate or "
                          "raise vlm.vdpo.nll_weight).**"]
        if sel.get("all_degenerate"):
            lines += ["", "> **WARNING: every γ gave an all-yes or all-no model on the validation questions; the "
                          "V-DPO row above is a degenerate model, kept for want of a better one.**"]
    stages = [("vlm_data", paths.vlm_data_dir(cfg)), ("vlm_sft", paths.vlm_sft_dir(cfg)), ("vdpo_pairs", paths.vdpo_pairs_dir(cfg))]
    stages += [(f"train {t}", paths.vdpo_dir(cfg, t)) for t in tags if t != "sft"]
    stages += [(f"pope {t}", paths.pope_dir(cfg, t)) for t in tags]
    lines += ["", "Time per stage (seconds, from provenance):", "", "| stage | s |", "|---|---|"]
    lines += [f"| {name} | {_seconds(path)} |" for name, path in stages]
    return "\n".join(lines) + "\n"
