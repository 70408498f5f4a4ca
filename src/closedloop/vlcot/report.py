"""Evaluation metrics and the report of the VL-CoT family (SPEC §6–7): held-out answer accuracy
by question type and grounding IoU / patch F1 with percentile-bootstrap CIs, paired gained/lost
tables with the exact McNemar test, the agreement of model- and function-based scores, and the
time each stage took (from each artifact's provenance record)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from closedloop import paths, stats
from closedloop.vlcot import chains, scenes


def metrics(rows: list[dict], preds: list[dict], grounded: bool, n_boot: int, level: float, seed: int) -> dict:
    """Accuracy overall and per question type; with ``grounded`` (a model with the vision head), mean
    IoU and patch F1 of its ⟨look⟩s against the gold ones (:func:`closedloop.vlcot.chains.grounding`)."""
    correct = [float(p["answer"] == r["answer"]) for r, p in zip(rows, preds, strict=True)]
    out = {"all": stats.summarise(correct, n_boot, level, seed),
           "by_type": {t: stats.summarise([c for c, r in zip(correct, rows, strict=True) if r["qtype"] == t],
                                          n_boot, level, seed) for t in scenes.QTYPES}}
    if grounded:
        g = [chains.grounding(p["looks"], scenes.looks(r["steps"])) for r, p in zip(rows, preds, strict=True)]
        for key in ("iou", "f1"):
            s = stats.summarise([x[key] for x in g], n_boot, level, seed)
            out[key] = {"mean": s["accuracy"], "ci_low": s["ci_low"], "ci_high": s["ci_high"], "n": s["n"]}
    return out


def _cell(m: dict | None, key: str = "accuracy") -> str:
    if not m or not m.get("n"):
        return "–"
    return f"{100 * m[key]:.1f} [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]"


def _seconds(directory: Path) -> float | None:
    record = directory / "provenance.json"
    if not record.is_file():
        return None
    p = json.loads(record.read_text())
    return (datetime.fromisoformat(p["finished"]) - datetime.fromisoformat(p["process_started"])).total_seconds()


def comparisons(tags: list[str]) -> list[tuple[str, str]]:
    """(before, after) pairs of the paired tables: each chain variant against the one it extends,
    and each rejection round against the vision SFT model and the round before."""
    order = [t for t in ("base", "direct", "text", "vision") if t in tags]
    pairs = list(zip(order, order[1:], strict=False))
    rounds = [t for t in tags if t.startswith("round")]
    for i, t in enumerate(rounds):
        if "vision" in tags:
            pairs.append(("vision", t))
        if i:
            pairs.append((rounds[i - 1], t))
    return list(dict.fromkeys(pairs))


def render(cfg) -> str:
    tags, split = paths.vlcot_model_tags(cfg), cfg.vlcot.eval.split
    ms = {t: json.loads((paths.vlcot_eval_dir(cfg, t) / "metrics.json").read_text()) for t in tags}
    correct = {}
    for t in tags:
        with open(paths.vlcot_eval_dir(cfg, t) / "predictions.jsonl") as fh:
            correct[t] = {r["id"]: r["correct"] for r in map(json.loads, fh)}
    level = int(100 * cfg.vlcot.eval.ci_level)
    head = "| model | all | " + " | ".join(scenes.QTYPES) + " | IoU | patch F1 |"
    lines = [head, "|---" * (len(scenes.QTYPES) + 4) + "|"]
    for t in tags:
        m = ms[t]
        lines.append(f"| {t} | {_cell(m['all'])} | " + " | ".join(_cell(m["by_type"][q]) for q in scenes.QTYPES)
                     + f" | {_cell(m.get('iou'), 'mean')} | {_cell(m.get('f1'), 'mean')} |")
    n = ms[tags[0]]["all"]["n"] if tags else 0
    paired = ["| before → after | n | gained | lost | exact McNemar p |", "|---|---|---|---|---|"]
    for before, after in comparisons(tags):
        c = stats.paired_change(correct[before], correct[after])
        paired.append(f"| {before} → {after} | {c['n']} | {c['gained']} | {c['lost']} | {c['p']:.3g} |")
    def pct(x):
        return "–" if x != x else f"{100 * x:.1f}%"  # nan: no question had both a right and a wrong chain

    agree = ["| round | chains | kept | Spearman ρ (all chains) | ρ within question (mean) | questions with right "
             "and wrong chains | model's favourite chain wrong | wrong chain over right (pairs) |",
             "|---|---|---|---|---|---|---|---|"]
    for k in range(1, cfg.vlcot.rejection.rounds + 1):
        d = paths.vlcot_round_dir(cfg, k)
        a, s = json.loads((d / "agreement.json").read_text()), json.loads((d / "stats.json").read_text())
        if a:
            agree.append(f"| {k} | {a['chains']} | {s['kept']}/{s['questions']} | {a['spearman_all']:.3f} | "
                         f"{a['spearman_within_mean']:.3f} | {a['questions_with_right_and_wrong']} | "
                         f"{pct(a['model_prefers_wrong_chain'])} | {pct(a['wrong_over_right_pairs'])} "
                         f"(n={a['n_pairs']}) |")
    dirs = {"vlcot_data": paths.vlcot_data_dir(cfg)}
    dirs |= {f"vlcot_sft {v}": paths.vlcot_sft_dir(cfg, v) for v in cfg.vlcot.sft.variants}
    dirs |= {f"vlcot_rejection round{k}": paths.vlcot_round_dir(cfg, k) for k in range(1, cfg.vlcot.rejection.rounds + 1)}
    dirs |= {f"vlcot_eval {t}": paths.vlcot_eval_dir(cfg, t) for t in tags}
    times = ["| stage | seconds |", "|---|---|"]
    times += [f"| {name} | {s:.0f} |" for name, d in dirs.items() if (s := _seconds(d)) is not None]
    mix = json.loads((paths.vlcot_data_dir(cfg) / "stats.json").read_text())["mix"]
    return f"""# VL-CoT with a vision head (SPEC §6): `{cfg.experiment}`

Answer accuracy (%) on the {split} split (n = {n}; question types {mix[split]}) by question type, and
grounding of the ⟨look⟩ steps (mean IoU / patch F1 with the gold patch sets, %, models with the vision
head), with {level}% percentile-bootstrap intervals. `base` is the untrained LLaVA answering directly,
`direct` SFT on answers alone, `text` SFT on text-only chains, `vision` SFT on interleaved chains with
the vision head, `round<k>` after k rounds of rejection-sampling tuning.

{chr(10).join(lines)}

## Question by question

Questions gained / lost on the same {split} questions, exact McNemar p (two-sided, uncorrected).

{chr(10).join(paired)}

## Model-based vs function-based scores of the sampled chains

Function score = answer correct + mean ⟨look⟩ IoU with gold; model score = the model's own P("yes") to
"Is this reasoning correct?" after its chain.

{chr(10).join(agree)}

## Time per stage

{chr(10).join(times)}
"""
