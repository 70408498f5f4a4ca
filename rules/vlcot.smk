# VL-CoT (SPEC §6): vlcot_data -> vlcot_sft (direct, text, vision) -> vlcot_rejection round 1..R
# -> vlcot_eval (each model) -> vlcot_report. Its own target, `snakemake --cores 2 vlcot_all` (not in
# `all`); outputs under results/<experiment>/vlcot/. Each job gets only the vlcot subsections it depends on.


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
        "closedloop run-stage vlcot_data --config-yaml {params.cfg:q} 2>&1 | tee {log}"


rule vlcot_all:
    input:
        str(paths.vlcot_data_dir(CFG)),
