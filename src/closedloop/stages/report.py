"""Stage ``report``: ``results/<experiment>/report.md`` plus PNG plots (:mod:`closedloop.reporting`),
and ``report.rst``: the run's overview (commit, seeds, base model, config difference from the
defaults) and the same tables, which ``snakemake --report``'s landing page shows; recorded as one
artifact with its sidecars."""

from __future__ import annotations

from closedloop import artifacts, dvc_store, paths
from closedloop import config as cl_config
from closedloop.report_rst import md_to_rst, overview_rst, run_overview
from closedloop.reporting import (
    collect,
    decoding_metrics,
    mcts_stats,
    plot_accuracy,
    plot_iterations,
    plot_losses,
    render,
    training_logs,
)


def main(cfg) -> None:
    """Write the report of ``cfg.experiment`` from its metrics, training logs and MCTS stats."""
    metrics, logs, stats = collect(cfg), training_logs(cfg), mcts_stats(cfg)
    decodings = decoding_metrics(cfg)
    plots = paths.plots_dir(cfg)
    started = artifacts.now()
    plot_accuracy(cfg, metrics, plots / "accuracy.png")
    plot_iterations(cfg, metrics, plots / "iterations.png")
    plot_losses(logs, plots / "training_loss.png")
    inputs = {f"eval/{tag}/{task}": paths.eval_dir(cfg, tag, task) / "metrics.json" for tag, task in metrics}
    inputs.update({f"eval/{tag}/{task}/predictions": paths.eval_dir(cfg, tag, task) / "predictions.jsonl"
                   for tag, task in metrics})
    inputs.update({f"mcts/iter{k}": paths.mcts_dir(cfg, k) / "merged" / "stats.json" for k in stats})
    inputs.update({f"decodings/{tag}/{task}/{d}": paths.decoding_eval_dir(cfg, tag, task, d) / "metrics.json"
                   for tag, task, d in decodings})
    view = cl_config.stage_view(cfg, "report")
    markdown = render(cfg, metrics, logs, stats, decodings)
    with artifacts.atomic_file(paths.report_file(cfg)) as fh:
        fh.write(markdown)
    overview = run_overview([paths.eval_dir(cfg, tag, task) for tag, task in metrics]
                            + [paths.mcts_dir(cfg, k) / "merged" for k in stats])
    with artifacts.atomic_file(paths.report_rst(cfg)) as fh:
        fh.write(overview_rst(cfg, overview, f"The experiment: {cfg.experiment}") + "\n" + md_to_rst(markdown))
    run, md, rst = paths.run_dir(cfg), paths.report_file(cfg), paths.report_rst(cfg)
    files = {md.name: artifacts.sha256_file(md), rst.name: artifacts.sha256_file(rst)}
    files.update({f"{plots.name}/{rel}": sha for rel, sha in artifacts.file_hashes(plots).items()})
    artifacts.write_sidecars(run, "report", view, inputs, started, cfg.seed, prefix="report.",
                             output=artifacts.output_record(md, files, primary=md.name))
    dvc_store.record([md, rst, plots, run / f"report.{artifacts.CONFIG}", run / f"report.{artifacts.PROVENANCE}"])
    print(f"report: {md.resolve()}")
