# COrAL (SPEC §5): order-agnostic post-training of the loop's policy in two stages, its
# evaluation with AR greedy and sliding blockwise decoding, the input policy with AR greedy
# (the "training tax"), and a report:  snakemake --cores 2 coral_all


rule coral_all:
    input:
        str(paths.coral_report_file(CFG)),


rule coral_stage1:
    input:
        data=str(paths.data_dir(CFG, CFG.coral.task)),
        model=model_artifact(paths.coral_input_tag(CFG)),  # coral.init: the loop's last policy or SFT
    output:
        directory(str(paths.coral_stage_dir(CFG, 1))),
    params:
        cfg=view_json("coral_stage1", [CFG.coral.task], model=paths.coral_input_tag(CFG)),
    threads: 8  # capped at --cores by Snakemake
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "coral" / "stage1.log"),
    benchmark:
        str(LOGS / "coral" / "stage1.benchmark.tsv")
    shell:
        "OMP_NUM_THREADS={threads} closedloop run-stage coral_stage1 --config-yaml {params.cfg:q} --log {log:q}"


rule coral_stage2:
    input:
        data=str(paths.data_dir(CFG, CFG.coral.task)),
        stage1=str(paths.coral_stage_dir(CFG, 1)),
    output:
        directory(str(paths.coral_stage_dir(CFG, 2))),
    params:
        cfg=view_json("coral_stage2", [CFG.coral.task], model=paths.coral_input_tag(CFG)),
    threads: 8  # capped at --cores by Snakemake
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "coral" / "stage2.log"),
    benchmark:
        str(LOGS / "coral" / "stage2.benchmark.tsv")
    shell:
        "OMP_NUM_THREADS={threads} closedloop run-stage coral_stage2 --config-yaml {params.cfg:q} --log {log:q}"


rule coral_evaluate:
    input:
        data=str(paths.data_dir(CFG, "{task}")),
        model=str(paths.coral_stage_dir(CFG, 2)),
    output:
        directory(str(paths.coral_eval_dir(CFG, "{coral_decoding}", "{task}"))),
    wildcard_constraints:
        coral_decoding="greedy|coral_blockwise",
    params:
        cfg=lambda w: view_json("coral_evaluate", [w.task]),
    threads: 1
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "coral" / "eval" / "{coral_decoding}" / "{task}.log"),
    benchmark:
        str(LOGS / "coral" / "eval" / "{coral_decoding}" / "{task}.benchmark.tsv")
    shell:
        "OMP_NUM_THREADS={threads} closedloop run-stage coral_evaluate --config-yaml {params.cfg:q}"
        " job.task={wildcards.task:q} job.decoding={wildcards.coral_decoding:q} --log {log:q}"


rule coral_report:
    input:
        [str(paths.coral_stage_dir(CFG, s)) for s in (1, 2)],
        [str(paths.coral_eval_dir(CFG, d, t)) for d, t in paths.coral_eval_runs(CFG)],
        [str(paths.eval_dir(CFG, paths.coral_input_tag(CFG), t)) for t in CFG.coral.eval_tasks],
    output:
        str(paths.coral_report_file(CFG)),
    params:
        cfg=view_json("coral_report"),
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "coral" / "report.log"),
    shell:
        "closedloop run-stage coral_report --config-yaml {params.cfg:q} --log {log:q}"
