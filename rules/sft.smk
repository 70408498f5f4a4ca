rule sft:
    input:
        str(paths.data_dir(CFG, CFG.sft.task)),
    output:
        directory(str(paths.sft_dir(CFG))),
    params:
        cfg=view_json("sft", [CFG.sft.task]),
        base_model=BASE_MODEL,
    threads: 8  # capped at --cores by Snakemake
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "sft.log"),
    benchmark:
        str(LOGS / "sft.benchmark.tsv")
    shell:
        "OMP_NUM_THREADS={threads} closedloop run-stage sft --config-yaml {params.cfg:q} --log {log:q}"
