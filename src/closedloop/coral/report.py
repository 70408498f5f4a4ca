"""The COrAL report section (SPEC §5, §7): accuracy with CIs of the input policy (AR greedy,
the shared evaluation), the COrAL model with AR greedy and with blockwise decoding; tokens
per forward pass and wall-time speed-up of blockwise over AR greedy; the paired gained / lost
table against the input policy (the "training tax"); the time of each training stage.

All accuracies are over the same questions: the input policy's are recomputed on the
questions the COrAL evaluations decoded (``coral.n_questions``).
"""

from __future__ import annotations

import json

import numpy as np

from closedloop import artifacts, paths, stats
from closedloop import config as cl_config


def _correct(directory) -> dict[str, bool]:
    return {r["id"]: bool(r["correct"][0]) for r in artifacts.read_jsonl(directory / "predictions.jsonl")}


def render(cfg) -> str:
    """The markdown of ``coral/report.md``."""
    ev, tag = cfg.eval, paths.coral_input_tag(cfg)
    lines = [f"# COrAL (SPEC §5)\n\nInput policy: `{tag}` (`coral.init: {cl_config.enum_value(cfg.coral.init)}`); "
             f"W_f = {cfg.coral.window}, n_back_pred = {cfg.coral.n_back_pred}; blockwise decoding "
             f"{dict(cfg.coral.decoding)}. Accuracy in % with a {int(100 * ev.ci_level)}% bootstrap CI.\n",
             "| task | model | decoding | accuracy | n | tokens / forward | s / question | wall speed-up vs AR |",
             "|---|---|---|---|---|---|---|---|"]
    paired = ["| task | decoding | gained / lost vs input policy | McNemar p |", "|---|---|---|---|"]
    for task in cfg.coral.eval_tasks:
        runs = {d: paths.coral_eval_dir(cfg, d, task) for d, t in paths.coral_eval_runs(cfg) if t == task}
        metrics = {d: json.loads((path / "metrics.json").read_text()) for d, path in runs.items()}
        ids = set.intersection(*[set(_correct(p)) for p in runs.values()]) if runs else set()
        base = {i: c for i, c in _correct(paths.eval_dir(cfg, tag, task)).items() if i in ids}
        s = stats.summarise(np.array([float(v) for v in base.values()]), ev.n_bootstrap, ev.ci_level, cfg.seed)
        lines.append(f"| {task} | {tag} | greedy (batched) | {_cell(s)} | {s['n']} | 1.00 | | |")
        ar = metrics.get("greedy")
        for d, m in metrics.items():
            speed = f"{ar['wall_seconds'] / m['wall_seconds']:.2f}×" if ar and m["wall_seconds"] else ""
            lines.append(f"| {task} | COrAL | {d} | {_cell(m)} | {m['n']} | {m['tokens_per_forward']:.2f} | "
                         f"{m['seconds_per_question']:.3f} | {speed} |")
            change = stats.paired_change(base, _correct(runs[d]))
            paired.append(f"| {task} | {d} | +{change['gained']} / −{change['lost']} | {change['p']:.2f} |")
    times = []
    for stage in (1, 2):
        stat = json.loads((paths.coral_stage_dir(cfg, stage) / "stats.json").read_text())
        times.append(f"stage {stage}: {stat['steps']} steps, {stat['trainable']:,} of {stat['total']:,} parameters "
                     f"trained, {stat['seconds']} s")
    return ("\n".join(lines) + "\n\n## Against the input policy, question by question\n\n" + "\n".join(paired)
            + "\n\n## Training\n\n" + "\n".join(f"- {t}" for t in times) + "\n")


def _cell(m: dict) -> str:
    return f"{100 * m['accuracy']:.1f} [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]"
