rule data:
    input:
        data_files,  # a jsonl task's own files; other sources are params
    output:
        directory(str(paths.data_dir(CFG, "{task}"))),
    params:
        cfg=lambda w: view_json("data", [w.task]),
        source=task_source,
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "data" / "{task}.log"),
    benchmark:
        str(LOGS / "data" / "{task}.benchmark.tsv")
    shell:
        "closedloop run-stage data --config-yaml {params.cfg:q} job.task={wildcards.task:q} --log {log:q}"


# The V-DPO branch's data (SPEC §4), built once with the experiment's seed and shared by every seed
# under `seeds` (like the tasks' data above); its training rules are in rules/vlm.smk.
rule vlm_data:
    output:
        directory(str(paths.vlm_data_dir(CFG))),
    params:
        cfg=view_json("vlm_data"),
        source=json.dumps(sources.vlm_data(), sort_keys=True),
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "vlm" / "vlm_data.log"),
    benchmark:
        str(LOGS / "vlm" / "vlm_data.benchmark.tsv")
    shell:
        "closedloop run-stage vlm_data --config-yaml {params.cfg:q} --log {log:q}"


# One .dvc file per experiment (data/<experiment>.dvc): each data job re-adds its experiment's
# data dir when it finishes; this makes the file a target of the DAG. Experiments never share it.
rule track_data:
    input:
        data_targets(),
    output:
        str(paths.data_dvc_file(CFG)),
    params:
        data_dir=lambda w, output: output[0].removesuffix(".dvc"),
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "track_data.log"),
    shell:
        "dvc add --quiet {params.data_dir:q} 2>&1 | tee {log:q}"


# DVC's own views of the experiment (`dvc metrics show|diff`, `dvc plots show`): a dvc.yaml with
# top-level metrics and plots and no stages, in results/<experiment>/ (one per experiment).
rule dvc_views:
    input:
        family_targets(),
    output:
        str(paths.dvc_views_file(CFG)),
    params:
        views=lambda w: json.dumps(dvc_views(), sort_keys=True),
    log:
        str(LOGS / "dvc_views.log"),
    run:
        dvc_store.write_views(output[0], json.loads(params.views), log[0])
