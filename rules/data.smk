rule data:
    output:
        directory(str(paths.data_dir(CFG, "{task}"))),
    params:
        cfg=lambda w: view_json("data", [w.task]),
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "data" / "{task}.log"),
    shell:
        "closedloop run-stage data --config-yaml {params.cfg:q} job.task={wildcards.task} 2>&1 | tee {log}"
