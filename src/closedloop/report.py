"""Stage ``report``: ``results/<experiment>/report.md`` plus PNG plots (accuracy with
CIs per task and model; the SFT loss curve), each plot marked for ``snakemake --report``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from closedloop import artifacts, paths  # noqa: E402
from closedloop import config as cl_config

PLOTS = ("accuracy.png", "sft_loss.png")


def collect(cfg) -> dict[tuple[str, str], dict]:
    """metrics.json of every (model, task) the experiment evaluates."""
    return {
        (tag, task): json.loads((paths.eval_dir(cfg, tag, task) / "metrics.json").read_text())
        for tag in cfg.eval.models for task in cfg.eval.tasks
    }


def cell(m: dict) -> str:
    return f"{100 * m['accuracy']:.1f} [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]"


def accuracy_table(cfg, metrics) -> str:
    tags = list(cfg.eval.models)
    lines = ["| task | n | " + " | ".join(tags) + " |", "|---|---|" + "---|" * len(tags)]
    for task in cfg.eval.tasks:
        n = metrics[(tags[0], task)]["n"]
        lines.append(f"| {task} | {n} | " + " | ".join(cell(metrics[(t, task)]) for t in tags) + " |")
    return "\n".join(lines)


def plot_accuracy(cfg, metrics, path: Path) -> None:
    tags, task_names = list(cfg.eval.models), list(cfg.eval.tasks)
    width = 0.8 / len(tags)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(task_names), 3.6))
    for i, tag in enumerate(tags):
        ms = [metrics[(tag, t)] for t in task_names]
        acc = [100 * m["accuracy"] for m in ms]
        err = [[100 * (m["accuracy"] - m["ci_low"]) for m in ms], [100 * (m["ci_high"] - m["accuracy"]) for m in ms]]
        xs = [j + (i - (len(tags) - 1) / 2) * width for j in range(len(task_names))]
        ax.bar(xs, acc, width, yerr=err, capsize=3, label=tag)
    ax.set_xticks(range(len(task_names)), task_names)
    ax.set_ylabel("accuracy (%), 95% bootstrap CI")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def read_log(path: Path) -> list[dict]:
    with open(path) as fh:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


def plot_loss(log: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("SFT loss")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    with artifacts.atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)


def mcts_section(cfg) -> str:
    """Pairs, pairs per tree, committed-path accuracy and the α distribution of iteration 1."""
    stats_path = paths.mcts_dir(cfg, 1) / "merged" / "stats.json"
    if not stats_path.exists():
        return ""
    st = json.loads(stats_path.read_text())
    a = st["alpha"]
    hist = ", ".join(f"{k}: {v}" for k, v in a.get("histogram", {}).items())
    return f"""
## MCTS data engine (iteration 1, policy = SFT)

{st['trees']} trees, {st['pairs']} step-level pairs ({st['pairs_per_tree']:.2f} per tree); committed
solutions correct in {100 * st['committed_accuracy']:.1f}% of trees.
α = min(N_l / (N_w + N_l), 0.5): mean {a.get('mean', float('nan')):.3f}, median {a.get('median', float('nan')):.3f};
histogram {hist}.
"""


def render(cfg, metrics, log) -> str:
    sources = "\n".join(
        f"- `{tag}/{task}`: model `{m['model'].get('path') or m['model'].get('source')}`, "
        f"data sha256 `{m['data']['sha256'][:12]}`, {m['decoding']} k={m['k']}, "
        f"{m['generated_tokens']} generated tokens, seed {m['seed']}"
        for (tag, task), m in metrics.items()
    )
    final_loss = f"{log[-1]['loss']:.3f} at step {int(log[-1]['step'])}" if log else "n/a"
    return f"""# {cfg.report.title}: `{cfg.experiment}`

Held-out accuracy (%) with {int(100 * cfg.eval.ci_level)}% bootstrap intervals.

{accuracy_table(cfg, metrics)}

![accuracy](plots/accuracy.png)

## SFT

Final logged training loss: {final_loss}.

![SFT loss](plots/sft_loss.png)
{mcts_section(cfg)}
## Where each score came from

{sources}
"""


def main(cfg) -> None:
    """Write the report of ``cfg.experiment`` from its metrics and training log."""
    metrics = collect(cfg)
    log_path = paths.sft_dir(cfg) / "train_log.csv"
    log = read_log(log_path) if log_path.exists() else []
    plots = paths.plots_dir(cfg)
    started = artifacts.now()
    plot_accuracy(cfg, metrics, plots / "accuracy.png")
    plot_loss(log, plots / "sft_loss.png")
    inputs = {f"eval/{tag}/{task}": paths.eval_dir(cfg, tag, task) / "metrics.json" for tag, task in metrics}
    if log:
        inputs["sft_log"] = log_path
    mcts_stats = paths.mcts_dir(cfg, 1) / "merged" / "stats.json"
    if mcts_stats.exists():
        inputs["mcts_stats"] = mcts_stats
    view = cl_config.stage_view(cfg, "report")
    artifacts.write_sidecars(paths.run_dir(cfg), "report", view, inputs, started, cfg.seed, prefix="report.")
    with artifacts.atomic_file(paths.report_file(cfg)) as fh:
        fh.write(render(cfg, metrics, log))
    print(f"report: {paths.report_file(cfg).resolve()}")
