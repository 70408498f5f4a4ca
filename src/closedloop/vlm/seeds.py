"""The V-DPO branch over seeds (``seeds: [...]`` with ``families: [.., vlm]``; SPEC §4, §7): every
seed trains its own SFT, DPO and V-DPO models on the same data (``data/<experiment>/vlm/``, built
once with the experiment's ``seed``), so every seed answers the same POPE-style questions and a
model's score can be paired with its own seed's SFT model question by question.

The report, ``results/<experiment>/vlm/report.md`` (stage ``vlm_seeds_report``):
  - per model, accuracy / F1 / yes-ratio overall and accuracy per POPE split: mean ± sample sd over
    seeds (:func:`closedloop.stats.seed_summary`), with each seed's value;
  - per trained model (DPO, V-DPO), the paired accuracy gain (points) over SFT with a two-level percentile
    bootstrap over seeds × questions (:func:`closedloop.stats.paired_gain_over_seeds`: a question
    is correct when its parsed answer equals its label);
  - per seed, the SFT stage's record: the attempt kept (``vlm.sft.restarts``), its validation accuracy
    and the grounding check;
  - the lowest held-out accuracy over seeds of every model (the robustness the branch promises:
    SFT ≥ 80 on every seed, and a preference step that never loses more than 2 points to its SFT).
"""

from __future__ import annotations

import json

from closedloop import artifacts, paths, stats
from closedloop.reporting import aligned, paired_gain_lines, seed_summary_cell
from closedloop.vlm.scenes import SPLITS

OVERALL = ("accuracy", "f1", "yes_ratio")


def _seed_cfgs(cfg) -> dict[int, object]:
    return {s: paths.for_seed(cfg, s) for s in cfg.seeds}


def correct_by_question(pope_dir) -> dict[str, float]:
    """Question id → 1.0 if the model's parsed answer equals the label, else 0.0 (``predictions.jsonl``)."""
    return {r["id"]: float(r["answer"] == r["label"]) for r in artifacts.read_jsonl(pope_dir / "predictions.jsonl")}


def aggregate(cfg) -> dict:
    """Per-seed metrics with mean ± sd, paired gains over SFT, and each seed's SFT record (see the module doc)."""
    tags, seed_cfgs = list(cfg.vlm.pope.models), _seed_cfgs(cfg)
    metrics = {t: {s: json.loads((paths.pope_dir(c, t) / "metrics.json").read_text()) for s, c in seed_cfgs.items()}
               for t in tags}
    out = {"seeds": list(cfg.seeds), "metrics": {}, "gain_over_sft": {}, "sft": {}}
    for t in tags:
        rows = {m: stats.seed_summary({s: metrics[t][s]["all"][m] for s in cfg.seeds}) for m in OVERALL}
        rows |= {f"{split}/accuracy": stats.seed_summary({s: metrics[t][s]["splits"][split]["accuracy"]
                                                          for s in cfg.seeds}) for split in SPLITS}
        out["metrics"][t] = rows
    if "sft" in tags:
        correct = {t: {s: correct_by_question(paths.pope_dir(c, t)) for s, c in seed_cfgs.items()} for t in tags}
        for t in tags:
            if t == "sft":
                continue
            ids = sorted(set.intersection(*(set(q) for q in [*correct["sft"].values(), *correct[t].values()])))
            out["gain_over_sft"][t] = stats.paired_gain_over_seeds(
                aligned(correct["sft"], ids), aligned(correct[t], ids), cfg.vlm.pope.n_bootstrap,
                cfg.vlm.pope.ci_level, cfg.seed)
    for s, c in seed_cfgs.items():
        record = json.loads((paths.vlm_sft_dir(c) / "stats.json").read_text())
        grounded = record.get("grounding") or {}
        out["sft"][s] = {"attempts": len(record.get("attempts") or [None]), "kept_attempt": record.get("kept_attempt", 0),
                         "validation_accuracy": (record.get("validation") or {}).get("accuracy"),
                         "grounding_flip_rate": grounded.get("flip_rate"), "grounding_passed": grounded.get("passed")}
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def render(cfg, agg: dict) -> str:
    """report.md over seeds (see the module doc)."""
    tags, seeds, level = list(agg["metrics"]), agg["seeds"], int(100 * cfg.vlm.pope.ci_level)
    lines = [f"# V-DPO branch (SPEC §4) over seeds {', '.join(map(str, seeds))}: `{cfg.experiment}`", "",
             "Each seed trains its own SFT, DPO and V-DPO models on the same data and answers the same held-out "
             "POPE-style questions (easy-VQA stand-in); per-seed reports: "
             + ", ".join(f"`seed{s}/vlm/report.md`" for s in seeds) + ".", "",
             "## Held-out POPE-style set (%): mean ± sd over seeds (per seed)", "",
             "| model | accuracy | F1 | yes-ratio | lowest accuracy |", "|---|---|---|---|---|"]
    for t in tags:
        m = agg["metrics"][t]
        lines.append(f"| {t} | {seed_summary_cell(m['accuracy'])} | {seed_summary_cell(m['f1'])} | {seed_summary_cell(m['yes_ratio'])} | "
                     f"{_pct(min(m['accuracy']['per_seed'].values()))} |")
    lines += ["", "Accuracy per negative type (%): mean ± sd over seeds (per seed):", "",
              "| model | " + " | ".join(SPLITS) + " |", "|---|" + "---|" * len(SPLITS)]
    lines += [f"| {t} | " + " | ".join(seed_summary_cell(agg["metrics"][t][f"{s}/accuracy"]) for s in SPLITS) + " |"
              for t in tags]
    if agg["gain_over_sft"]:
        lines += paired_gain_lines(level, ["model"], [([t], g) for t, g in agg["gain_over_sft"].items()])
    lines += ["", "## SFT per seed", "",
              "| seed | attempts | kept | validation accuracy | grounding flips | grounding |", "|---|---|---|---|---|---|"]
    for s, r in agg["sft"].items():
        passed = {True: "passed", False: "FAILED", None: "n/a"}[r["grounding_passed"]]
        lines.append(f"| {s} | {r['attempts']} | {r['kept_attempt']} | {_pct(r['validation_accuracy'])} | "
                     f"{_pct(r['grounding_flip_rate'])} | {passed} |")
    return "\n".join(lines) + "\n"
