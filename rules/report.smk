rule report:
    input:
        eval_dirs(),
        mcts_targets(),
        decoding_dirs(),
    output:
        md=str(paths.report_file(CFG)),
        accuracy=report(
            str(paths.plots_dir(CFG) / "accuracy.png"),
            caption="../workflow/report/accuracy.rst",
            category="Evaluation",
        ),
        iterations=report(
            str(paths.plots_dir(CFG) / "iterations.png"),
            caption="../workflow/report/iterations.rst",
            category="Evaluation",
        ),
        loss=report(
            str(paths.plots_dir(CFG) / "training_loss.png"),
            caption="../workflow/report/training_loss.rst",
            category="Training",
        ),
    params:
        cfg=view_json("report"),
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "report.log"),
    benchmark:
        str(LOGS / "report.benchmark.tsv")
    shell:
        "closedloop run-stage report --config-yaml {params.cfg:q} 2>&1 | tee {log:q}"
