rule evaluate:
    input:
        data=str(paths.data_dir(CFG, "{task}")),
        model=lambda w: model_artifact(w.model),
    output:
        directory(str(paths.eval_dir(CFG, "{model}", "{task}"))),
    params:
        cfg=lambda w: view_json("evaluate", [w.task]),
        base_model=base_model_source,
    threads: 1
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "evaluate" / "{model}" / "{task}.log"),
    benchmark:
        str(LOGS / "evaluate" / "{model}" / "{task}.benchmark.tsv")
    shell:
        "OMP_NUM_THREADS={threads} closedloop run-stage evaluate --config-yaml {params.cfg:q}"
        " job.model={wildcards.model:q} job.task={wildcards.task:q} --log {log:q}"


rule evaluate_decoding:
    input:
        data=str(paths.data_dir(CFG, "{task}")),
        model=lambda w: model_artifact(w.model),
    output:
        directory(str(paths.decoding_eval_dir(CFG, "{model}", "{task}", "{decoding}"))),
    params:
        cfg=lambda w: view_json("evaluate_decoding", [w.task]),
        base_model=base_model_source,
    threads: 1
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "decodings" / "{model}" / "{task}" / "{decoding}.log"),
    benchmark:
        str(LOGS / "decodings" / "{model}" / "{task}" / "{decoding}.benchmark.tsv")
    shell:
        "OMP_NUM_THREADS={threads} closedloop run-stage evaluate_decoding --config-yaml {params.cfg:q}"
        " job.model={wildcards.model:q} job.task={wildcards.task:q} job.decoding={wildcards.decoding:q}"
        " --log {log:q}"
