rule data:
    output:
        directory(str(paths.data_dir(CFG, "{task}"))),
    params:
        cfg=lambda w: view_json("data", [w.task]),
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "data" / "{task}.log"),
    benchmark:
        str(LOGS / "data" / "{task}.benchmark.tsv")
    shell:
        "closedloop run-stage data --config-yaml {params.cfg:q} job.task={wildcards.task:q} --log {log:q}"


rule track_data:
    input:
        [str(paths.data_dir(CFG, t)) for t in data_tasks()],
    output:
        f"{CFG.data_dir}.dvc",
    params:
        data_dir=lambda w, output: output[0].removesuffix(".dvc"),
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "track_data.log"),
    shell:
        "dvc add --quiet {params.data_dir:q} 2>&1 | tee {log:q}"
