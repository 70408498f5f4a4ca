# VL-CoT (SPEC §6): vlcot_data -> vlcot_sft (direct, text, vision) -> vlcot_rejection round 1..R
# -> vlcot_eval (each model) -> vlcot_report. In `all` when `families` holds vlcot, or
# alone: `snakemake --cores 2 vlcot_all`; outputs under results/<experiment>/vlcot/. Each job gets only the vlcot subsections it depends on.


VLCOT_LOGS = LOGS / "vlcot"


rule vlcot_data:
    output:
        directory(str(paths.vlcot_data_dir(CFG))),
    params:
        cfg=view_json("vlcot_data"),
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(VLCOT_LOGS / "vlcot_data.log"),
    benchmark:
        str(VLCOT_LOGS / "vlcot_data.benchmark.tsv")
    shell:
        "closedloop run-stage vlcot_data --config-yaml {params.cfg:q} --log {log:q}"


rule vlcot_sft:
    input:
        str(paths.vlcot_data_dir(CFG)),
    output:
        directory(str(paths.vlcot_sft_dir(CFG, "{variant}"))),
    wildcard_constraints:
        variant="direct|text|vision",
    params:
        cfg=lambda w: view_json("vlcot_sft", model=w.variant),
    threads: 1  # a 16-chain step of the tiny model: 1.0 s wall with 1 thread, 6.9 s with 2 (2 shared cores, measured)
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(VLCOT_LOGS / "sft_{variant}.log"),
    benchmark:
        str(VLCOT_LOGS / "sft_{variant}.benchmark.tsv")
    shell:
        "OMP_NUM_THREADS={threads} closedloop run-stage vlcot_sft --config-yaml {params.cfg:q}"
        " job.model={wildcards.variant:q} --log {log:q}"


rule vlcot_rejection:
    input:
        data=str(paths.vlcot_data_dir(CFG)),
        model=lambda w: paths.vlcot_model_inputs(CFG, f"round{int(w.k) - 1}"),
    output:
        directory(str(paths.vlcot_round_dir(CFG, "{k}"))),
    params:
        cfg=lambda w: view_json("vlcot_rejection", model=f"round{w.k}"),
    threads: 1  # a 16-chain step of the tiny model: 1.0 s wall with 1 thread, 6.9 s with 2 (2 shared cores, measured)
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(VLCOT_LOGS / "rejection_round{k}.log"),
    benchmark:
        str(VLCOT_LOGS / "rejection_round{k}.benchmark.tsv")
    shell:
        "OMP_NUM_THREADS={threads} closedloop run-stage vlcot_rejection --config-yaml {params.cfg:q}"
        " job.model=round{wildcards.k:q} --log {log:q}"


rule vlcot_eval:
    input:
        data=str(paths.vlcot_data_dir(CFG)),
        model=lambda w: paths.vlcot_model_inputs(CFG, w.vlcot_model),
    output:
        directory(str(paths.vlcot_eval_dir(CFG, "{vlcot_model}"))),
    wildcard_constraints:
        vlcot_model=r"base|direct|text|vision|round\d+",
    params:
        cfg=lambda w: view_json("vlcot_eval", model=w.vlcot_model),
    threads: 1
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(VLCOT_LOGS / "eval_{vlcot_model}.log"),
    benchmark:
        str(VLCOT_LOGS / "eval_{vlcot_model}.benchmark.tsv")
    shell:
        "OMP_NUM_THREADS={threads} closedloop run-stage vlcot_eval --config-yaml {params.cfg:q}"
        " job.model={wildcards.vlcot_model:q} --log {log:q}"


rule vlcot_report:
    input:
        [str(paths.vlcot_eval_dir(CFG, t)) for t in paths.vlcot_model_tags(CFG)],
        [str(paths.vlcot_round_dir(CFG, k)) for k in range(1, CFG.vlcot.rejection.rounds + 1)],
    output:
        str(paths.vlcot_report_file(CFG)),
    params:
        cfg=view_json("vlcot_report"),
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(VLCOT_LOGS / "vlcot_report.log"),
    shell:
        "closedloop run-stage vlcot_report --config-yaml {params.cfg:q} --log {log:q}"


rule vlcot_all:
    input:
        str(paths.vlcot_report_file(CFG)),
