# The report: report.md, report.rst (the same tables with the run's overview) and the plots. For
# `snakemake --report report.html` the landing page (workflow/report/workflow.rst) includes every
# report.rst marked below (and the V-DPO branch's, rules/vlm.smk); the plots are captioned entries.
report: "../workflow/report/workflow.rst"


rule report:
    input:
        eval_dirs(),
        mcts_targets(),
        decoding_dirs(),
    output:
        md=str(paths.report_file(CFG)),
        rst=report(
            str(paths.report_rst(CFG)),
            caption="../workflow/report/tables.rst",
            category="Tables",
            labels={"report": "closed loop"},
        ),
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
        "closedloop run-stage report --config-yaml {params.cfg:q} --log {log:q}"
