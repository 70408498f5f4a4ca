"""The experiment report's pieces (stage ``report``): the markdown tables of report.md and
its PNG plots: held-out accuracy with CIs per model and task, accuracy per closed-loop
iteration (and per ablation) for every task, the paired table against SFT, training
losses with DPO's reward margin and preference accuracy, MCTS data, the decoding comparison.

The same report as reStructuredText for ``snakemake --report``: :mod:`closedloop.report_rst`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from closedloop import artifacts, paths, stats  # noqa: E402
from closedloop import config as cl_config  # noqa: E402

PLOTS = ("accuracy.png", "iterations.png", "training_loss.png")


def collect(cfg) -> dict[tuple[str, str], dict]:
    """metrics.json of every (model tag, task) the experiment evaluates."""
    return {(tag, task): json.loads((paths.eval_dir(cfg, tag, task) / "metrics.json").read_text())
            for tag in paths.eval_model_tags(cfg) for task in cfg.eval.tasks}


def cell(m: dict) -> str:
    return f"{100 * m['accuracy']:.1f} [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]"


def accuracy_table(cfg, metrics) -> str:
    tasks = list(cfg.eval.tasks)
    n = " / ".join(str(metrics[(paths.eval_model_tags(cfg)[0], t)]["n"]) for t in tasks)
    lines = [f"| model | {' | '.join(tasks)} |", "|---|" + "---|" * len(tasks)]
    for tag in paths.eval_model_tags(cfg):
        lines.append(f"| {tag} | " + " | ".join(cell(metrics[(tag, t)]) for t in tasks) + " |")
    level = int(100 * cfg.eval.ci_level)
    return (f"Held-out accuracy (%) with {level}% bootstrap intervals; n per task: {n}\n\n"
            + "\n".join(lines))


def iteration_series(cfg, metrics, variant: str, task: str) -> list[tuple[int, dict]]:
    """(k, metrics) for k = 0 (the SFT policy) and each evaluated iteration of one loop variant
    (:func:`closedloop.paths.evaluated_iterations`)."""
    series = [(0, metrics[("sft", task)])] if ("sft", task) in metrics else []
    return series + [(k, metrics[(paths.model_tag(k, variant), task)]) for k in paths.evaluated_iterations(cfg, variant)]


def iteration_table(cfg, metrics) -> str:
    """Accuracy per iteration of each loop variant; "–" where a policy was not evaluated."""
    ks = range(0, cfg.loop.iterations + 1)
    lines = ["| task | loop | " + " | ".join("SFT" if k == 0 else f"iter {k}" for k in ks) + " |",
             "|---|---|" + "---|" * len(ks)]
    for task in cfg.eval.tasks:
        for variant in paths.loop_variants(cfg):
            series = dict(iteration_series(cfg, metrics, variant, task))
            lines.append(f"| {task} | {variant} | "
                         + " | ".join(cell(series[k]) if k in series else "–" for k in ks) + " |")
    return "\n".join(lines)


def correct_by_id(cfg, tag: str, task: str) -> dict[str, bool] | None:
    """Question id → right or wrong, from an evaluation's predictions; None when a question
    has several samples (the paired test needs one answer per question)."""
    rows = artifacts.read_jsonl(paths.eval_dir(cfg, tag, task) / "predictions.jsonl")
    if any(len(r["correct"]) != 1 for r in rows):
        return None
    return {r["id"]: bool(r["correct"][0]) for r in rows}


def paired_table(cfg) -> str:
    """Every loop policy against the SFT model on the same questions: gained / lost and
    the exact McNemar p-value (uncorrected for the number of comparisons)."""
    if "sft" not in cfg.eval.models:
        return ""
    lines = ["| task | loop | " + " | ".join(f"iter {k}" for k in range(1, cfg.loop.iterations + 1)) + " |",
             "|---|---|" + "---|" * cfg.loop.iterations]
    for task in cfg.eval.tasks:
        sft = correct_by_id(cfg, "sft", task)
        if sft is None:
            return ""
        for variant in paths.loop_variants(cfg):
            cells, evaluated = [], paths.evaluated_iterations(cfg, variant)
            for k in range(1, cfg.loop.iterations + 1):
                if k not in evaluated:
                    cells.append("–")
                    continue
                change = stats.paired_change(sft, correct_by_id(cfg, paths.model_tag(k, variant), task) or {})
                cells.append(f"+{change['gained']} / −{change['lost']}, p {change['p']:.2f}")
            lines.append(f"| {task} | {variant} | " + " | ".join(cells) + " |")
    return ("\n## Against SFT, question by question\n\nQuestions gained / lost against the SFT model on the same "
            f"{cl_config.enum_value(cfg.eval.split)} questions, exact McNemar p (two-sided, uncorrected).\n\n"
            + "\n".join(lines) + "\n")


def _errorbars(ms: list[dict]) -> list[list[float]]:
    return [[100 * (m["accuracy"] - m["ci_low"]) for m in ms], [100 * (m["ci_high"] - m["accuracy"]) for m in ms]]


def plot_accuracy(cfg, metrics, path: Path) -> None:
    tags, tasks = paths.eval_model_tags(cfg), list(cfg.eval.tasks)
    width = 0.8 / len(tags)
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(tasks), 3.8))
    for i, tag in enumerate(tags):
        ms = [metrics[(tag, t)] for t in tasks]
        xs = [j + (i - (len(tags) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, [100 * m["accuracy"] for m in ms], width, yerr=_errorbars(ms), capsize=2, label=tag)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy (%), 95% bootstrap CI")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_iterations(cfg, metrics, path: Path) -> None:
    tasks = list(cfg.eval.tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for variant in paths.loop_variants(cfg):
            series = iteration_series(cfg, metrics, variant, task)
            ms = [m for _, m in series]
            ax.errorbar([k for k, _ in series], [100 * m["accuracy"] for m in ms], yerr=_errorbars(ms),
                        marker="o", capsize=3, label=variant)
        low, high = ax.get_ylim()
        low, high = max(0.0, low), min(100.0, max(high, low + 5.0))  # accuracy lives in 0–100; at least 5 points
        ax.set_ylim(low, high)
        ax.set_title(f"{task}\n(own y-axis: {low:.0f}–{high:.0f}%)", fontsize=9)
        ax.set_xlabel("iteration (0 = SFT)")
        ax.set_ylabel("accuracy (%)")
        ax.set_xticks(range(cfg.loop.iterations + 1))
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Held-out accuracy per iteration, 95% CI. Each panel has its own y-axis range.", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as fh:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


def training_logs(cfg) -> dict[str, list[dict]]:
    logs = {"sft": read_log(paths.sft_dir(cfg) / "train_log.csv")}
    for variant in paths.loop_variants(cfg):
        for k in range(1, cfg.loop.iterations + 1):
            logs[f"dpo {paths.model_tag(k, variant)}"] = read_log(paths.dpo_dir(cfg, k, variant) / "train_log.csv")
    return {name: log for name, log in logs.items() if log}


TRAINING_PANELS = (("loss", "SFT loss", "loss"), ("loss", "DPO loss per iteration", "loss"),
                   ("reward_margin", "DPO reward margin", "mean β·h (chosen − rejected reward)"),
                   ("reward_accuracy", "DPO preference accuracy", "fraction of pairs, chosen reward > rejected"))


def plot_losses(logs: dict[str, list[dict]], path: Path) -> None:
    """SFT's loss, then per DPO run its loss, TRL's ``rewards/margins`` and ``rewards/accuracies``
    per logged step, one panel each with its own labelled y-axis (accuracy on 0–1)."""
    fig, axes = plt.subplots(1, len(TRAINING_PANELS), figsize=(15, 3.4))
    for ax, (column, title, ylabel) in zip(axes, TRAINING_PANELS, strict=True):
        sft_panel = title.startswith("SFT")
        for name, log in logs.items():
            if (name == "sft") != sft_panel:
                continue
            rows = [r for r in log if column in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[column] for r in rows], marker=".", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel, fontsize=8)
        if column == "reward_accuracy":
            ax.set_ylim(-0.05, 1.05)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Training logs per logged step (each panel has its own y-axis)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    with artifacts.atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)


def mcts_stats(cfg) -> dict[int, dict]:
    out = {}
    for k in range(1, cfg.loop.iterations + 1):
        path = paths.mcts_dir(cfg, k) / "merged" / "stats.json"
        if path.exists():
            out[k] = json.loads(path.read_text())
    return out


def mcts_section(stats: dict[int, dict]) -> str:
    if not stats:
        return ""
    lines = ["| iteration | trees | pairs | pairs/tree | committed correct | α mean | α median | α histogram |",
             "|---|---|---|---|---|---|---|---|"]
    for k, st in stats.items():
        a = st["alpha"]
        hist = ", ".join(f"{b}: {c}" for b, c in a.get("histogram", {}).items())
        lines.append(f"| {k} | {st['trees']} | {st['pairs']} | {st['pairs_per_tree']:.2f} | "
                     f"{100 * st['committed_accuracy']:.1f}% | {a.get('mean', float('nan')):.3f} | "
                     f"{a.get('median', float('nan')):.3f} | {hist} |")
    return "\n## MCTS data (closed loop; iteration k searches with policy_{k-1})\n\n" + "\n".join(lines) + "\n"


def decoding_metrics(cfg) -> dict[tuple[str, str, str], dict]:
    """(model tag, task, decoding) -> metrics of the matched-budget decoding comparison."""
    return {run: json.loads((paths.decoding_eval_dir(cfg, *run) / "metrics.json").read_text())
            for run in paths.decoding_runs(cfg)}


def decoding_section(cfg, metrics: dict[tuple[str, str, str], dict]) -> str:
    """Accuracy of each decoding with the tokens it generated (SPEC §1 comparison)."""
    if not metrics:
        return ""
    lines = ["| model | task | decoding | accuracy (%) | generated tokens | tokens / question | budget |",
             "|---|---|---|---|---|---|---|"]
    for (tag, task, decoding), m in metrics.items():
        budget = (f"k={m['k']}" if decoding in ("sampled", "self_consistency") else
                  f"beams {m['beam']['k']} × candidates {m['beam']['n']}" if decoding == "beam_self_eval" else "1")
        lines.append(f"| {tag} | {task} | {decoding} | {cell(m)} | {m['generated_tokens']} | "
                     f"{m['generated_tokens_per_question']:.1f} | {budget} |")
    n = cfg.decodings.n_questions or "all"
    return (f"\n## Decodings at matched generated-token budgets (first {n} held-out questions)\n\n"
            + "\n".join(lines) + "\n")


def software_line(cfg, metrics) -> str:
    """Library versions (the SFT artifact's provenance) and the precision used: the training
    dtype and bf16 autocast setting (the SFT job's config), the evaluated weights' dtypes and
    devices (``cpu``, ``cuda``)."""
    sft = paths.sft_dir(cfg)
    try:
        packages = json.loads((sft / artifacts.PROVENANCE).read_text())["packages"]
        model = cl_config.load_yaml(sft / artifacts.CONFIG).model
    except (OSError, KeyError, cl_config.ConfigError):
        return "Software and precision: n/a (no SFT provenance)."
    autocast = {True: "on", False: "off", None: "auto (on where the CPU or GPU has bf16 units)"}[model.bf16_training]
    dtypes = sorted({m["dtype"] for m in metrics.values() if "dtype" in m})
    devices = sorted({m["device"] for m in metrics.values() if "device" in m})
    versions = ", ".join(f"{k} {packages.get(k)}" for k in ("python", "torch", "transformers", "trl", "lm-eval")
                         if packages.get(k))
    return (f"Software: {versions}. Precision: training weights {model.dtype}, bf16 autocast {autocast}; "
            f"evaluation weights {', '.join(dtypes) or 'n/a'}"
            + (f" on {', '.join(devices)}" if devices else "") + " (log-softmax of scored choices in float32).")


def render(cfg, metrics, logs, stats, decodings=None) -> str:
    sources = "\n".join(
        f"- `{tag}/{task}`: model `{m['model'].get('path') or m['model'].get('source')}`, "
        f"data sha256 `{m['data']['sha256'][:12]}`, {m['decoding']} k={m['k']}, "
        f"{m['generated_tokens']} generated tokens, seed {m['seed']}"
        + (f", invalid answers {100 * m['invalid_rate']:.1f}%" if m.get("invalid_rate") is not None else "")
        + (f", acc_norm {100 * m['acc_norm']['accuracy']:.1f}" if "acc_norm" in m else "")
        for (tag, task), m in metrics.items())
    return f"""# {cfg.report.title}: `{cfg.experiment}`

{accuracy_table(cfg, metrics)}

![accuracy](plots/accuracy.png)

## Accuracy per iteration (policy_k → MCTS → cDPO → policy_k+1)

{iteration_table(cfg, metrics)}

![iterations](plots/iterations.png)
{paired_table(cfg)}
## Training

Last logged values of each training run (DPO: TRL's rewards/margins and rewards/accuracies).

{training_summary(logs) or 'No training logs.'}

![training loss](plots/training_loss.png)
{mcts_section(stats)}{decoding_section(cfg, decodings or {})}
## Where each score came from

{software_line(cfg, metrics)}

{sources}
"""


def training_summary(logs: dict[str, list[dict]]) -> str:
    """One table: each training run's last logged loss, and for DPO its reward margin and accuracy."""
    if not logs:
        return ""
    lines = ["| run | last logged step | loss | reward margin | preference accuracy |", "|---|---|---|---|---|"]
    for name, log in logs.items():
        last = log[-1]
        margin = f"{last['reward_margin']:.4f}" if "reward_margin" in last else "–"
        acc = f"{last['reward_accuracy']:.2f}" if "reward_accuracy" in last else "–"
        lines.append(f"| {name} | {int(last['step'])} | {last['loss']:.4f} | {margin} | {acc} |")
    return "\n".join(lines)


# ---- the report over seeds (``seeds: [...]``, stage ``seeds_report``) -------------------------


def per_question(cfg, tag: str, task: str) -> dict[str, float]:
    """Question id → score (the mean over samples) of one evaluation's predictions."""
    rows = artifacts.read_jsonl(paths.eval_dir(cfg, tag, task) / "predictions.jsonl")
    return {r["id"]: sum(map(float, r["correct"])) / len(r["correct"]) for r in rows}


def seed_scores(cfg) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    """(model tag, task) → seed → question id → score, for every seed of ``cfg.seeds``."""
    return {(tag, task): {s: per_question(paths.for_seed(cfg, s), tag, task) for s in cfg.seeds}
            for tag in paths.eval_model_tags(cfg) for task in cfg.eval.tasks}


def aligned(scores: dict[int, dict[str, float]], ids: list[str]):
    """(seeds, questions) array of ``scores`` on question ``ids`` (rows in seed order)."""
    import numpy as np

    return np.array([[by_id[i] for i in ids] for _, by_id in sorted(scores.items())])


def seeds_aggregate(cfg, scores, n_boot: int, level: float) -> dict:
    """Per-seed accuracy with mean ± sd for every (model, task); for every trained policy the
    paired gain over the SFT model of the same seed; and with ablations, the closed loop's final
    policy against each ablation's (the talk's ranking, SPEC §3), paired the same way
    (:func:`closedloop.stats.paired_gain_over_seeds`)."""
    out = {"accuracy": {}, "gain_over_sft": {}, "closed_loop_over_ablation": {}}
    for (tag, task), by_seed in scores.items():
        out["accuracy"][f"{tag}/{task}"] = stats.seed_summary(
            {s: sum(q.values()) / len(q) for s, q in sorted(by_seed.items())})

    def gain(baseline, model):
        ids = sorted(set.intersection(*(set(q) for q in [*baseline.values(), *model.values()])))
        return stats.paired_gain_over_seeds(aligned(baseline, ids), aligned(model, ids), n_boot, level, cfg.seed)

    last = cfg.loop.iterations
    for task, variant in [(t, v) for t in cfg.eval.tasks for v in cfg.loop.ablations] if last else ():
        out["closed_loop_over_ablation"][f"{variant}/{task}"] = gain(
            scores[(paths.model_tag(last, variant), task)], scores[(paths.model_tag(last), task)])
    if "sft" not in cfg.eval.models:
        return out
    for (tag, task), by_seed in scores.items():
        if tag not in ("base", "sft"):
            out["gain_over_sft"][f"{tag}/{task}"] = gain(scores[("sft", task)], by_seed)
    return out


def render_seeds(cfg, agg: dict) -> str:
    """report.md over seeds: accuracy per seed with mean ± sd; paired gains over SFT with intervals."""
    seeds, tasks, level = list(cfg.seeds), list(cfg.eval.tasks), int(100 * cfg.eval.ci_level)
    lines = [f"# {cfg.report.title}: `{cfg.experiment}` over seeds {', '.join(map(str, seeds))}", "",
             f"Each seed runs the whole experiment (SFT, search, DPO, evaluation) on the same data; per-seed "
             f"reports: {', '.join(f'`seed{s}/report.md`' for s in seeds)}.", "",
             "## Accuracy (%): mean ± sd over seeds (per seed)", "",
             "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for tag in paths.eval_model_tags(cfg):
        lines.append(f"| {tag} | " + " | ".join(seed_summary_cell(agg["accuracy"][f"{tag}/{task}"]) for task in tasks) + " |")
    if agg["gain_over_sft"]:
        lines += paired_gain_lines(level, ["model", "task"],
                                   [(key.rsplit("/", 1), g) for key, g in agg["gain_over_sft"].items()])
    if agg.get("closed_loop_over_ablation"):
        lines += paired_gain_lines(
            level, ["ablation", "task"], [(key.rsplit("/", 1), g) for key, g in agg["closed_loop_over_ablation"].items()],
            title=f"The closed loop's iteration-{cfg.loop.iterations} policy against each ablation's (points; "
                  "positive: the closed loop is ahead)")
    return "\n".join(lines) + "\n"


def seed_summary_cell(a: dict) -> str:
    """A :func:`closedloop.stats.seed_summary` as a table cell in %: mean ± sd (each seed's value)."""
    per = " / ".join(f"{100 * v:.1f}" for v in a["per_seed"].values())
    return f"{100 * a['mean']:.1f} ± {100 * a['sd']:.1f} ({per})"


def paired_gain_lines(level: int, key_headers: list[str], rows: list[tuple[list[str], dict]],
                      title: str = "Gain over SFT (points)") -> list[str]:
    """The report section of paired gains over SFT, or over another baseline named in ``title``
    (:func:`closedloop.stats.paired_gain_over_seeds`): one table row per (key cells, gain record)."""
    lines = ["", f"## {title}, paired by seed and question, {level}% interval over seeds × questions",
             "", "Two-level percentile bootstrap: seeds drawn with replacement, then questions (one draw shared by "
             "the drawn seeds); gained / lost summed over seeds.", "",
             "| " + " | ".join(key_headers) + " | gain [interval] | per seed | gained / lost |",
             "|---|" + "---|" * (len(key_headers) + 2)]
    for keys, g in rows:
        per = " / ".join(f"{100 * v:+.1f}" for v in g["per_seed"])
        lines.append("| " + " | ".join(keys) + f" | {100 * g['gain']:+.1f} [{100 * g['ci_low']:+.1f}, "
                     f"{100 * g['ci_high']:+.1f}] | {per} | +{g['gained']} / −{g['lost']} |")
    return lines
