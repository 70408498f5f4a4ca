# V-DPO branch (SPEC §4): vlm_data (rules/data.smk) -> vlm_sft -> vdpo_pairs -> {vdpo, dpo} -> pope -> vlm_report.
# In `all` when `families` has vlm; alone: `snakemake --cores 2 vdpo_all`. Outputs under
# results/<experiment>/vlm/. Each job gets only the vlm subsections it depends on (the stage table's
# sections), so the LLM experiment is untouched, unless `vlm.model.text_backbone: loop_policy` builds
# the VLM on the closed loop's last policy (SFT -> MCTS -> DPO_k -> V-DPO in one DAG). Under `seeds`
# these rules run once per seed (rules/seed_run.smk) on the one shared vlm_data.


VLM_LOGS = LOGS / "vlm"


rule vlm_sft:
    input:
        data=str(paths.vlm_data_dir(CFG)),
        text_backbone=vlm_text_backbone(),  # loop_policy: the closed loop's last policy
    output:
        directory(str(paths.vlm_sft_dir(CFG))),
    params:
        cfg=view_json("vlm_sft", model=vlm_text_backbone_model()),
        base_model=json.dumps(sources.vlm_text_backbone(CFG.vlm.model), sort_keys=True),
    threads: CFG.vlm.sft.cpu_threads or 8  # capped at --cores by Snakemake
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(VLM_LOGS / "vlm_sft.log"),
    benchmark:
        str(VLM_LOGS / "vlm_sft.benchmark.tsv")
    shell:
        "OMP_NUM_THREADS={threads} closedloop run-stage vlm_sft --config-yaml {params.cfg:q} --log {log:q}"


rule vdpo_pairs:
    input:
        [str(paths.vlm_data_dir(CFG))] + ([str(paths.vlm_sft_dir(CFG))] if CFG.vlm.pairs.alpha == "score" else []),
    output:
        directory(str(paths.vdpo_pairs_dir(CFG))),
    params:
        cfg=view_json("vdpo_pairs"),
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(VLM_LOGS / "vdpo_pairs.log"),
    benchmark:
        str(VLM_LOGS / "vdpo_pairs.benchmark.tsv")
    shell:
        "closedloop run-stage vdpo_pairs --config-yaml {params.cfg:q} --log {log:q}"


# V-DPO (γ = vlm.vdpo.gamma) and its plain-DPO ablation (γ = 1) on the same pairs.
rule vdpo:
    input:
        pairs=str(paths.vdpo_pairs_dir(CFG)),
        sft=str(paths.vlm_sft_dir(CFG)),
        data=str(paths.vlm_data_dir(CFG)),
    output:
        directory(str(paths.vlm_run_dir(CFG) / "{variant}")),
    wildcard_constraints:
        variant="dpo|vdpo",
    params:
        cfg=lambda w: view_json("vdpo", model=w.variant),
    threads: 8  # capped at --cores by Snakemake
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(VLM_LOGS / "{variant}.log"),
    benchmark:
        str(VLM_LOGS / "{variant}.benchmark.tsv")
    shell:
        "OMP_NUM_THREADS={threads} closedloop run-stage vdpo --config-yaml {params.cfg:q}"
        " job.variant={wildcards.variant:q} --log {log:q}"


rule pope:
    input:
        data=str(paths.vlm_data_dir(CFG)),
        model=lambda w: str(paths.vlm_model_dir(CFG, w.vlm_model).parent),
    output:
        directory(str(paths.pope_dir(CFG, "{vlm_model}"))),
    wildcard_constraints:
        vlm_model="sft|dpo|vdpo",
    params:
        cfg=lambda w: view_json("pope", model=w.vlm_model),
    threads: 2
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(VLM_LOGS / "pope" / "{vlm_model}.log"),
    benchmark:
        str(VLM_LOGS / "pope" / "{vlm_model}.benchmark.tsv")
    shell:
        "OMP_NUM_THREADS={threads} closedloop run-stage pope --config-yaml {params.cfg:q}"
        " job.model={wildcards.vlm_model:q} --log {log:q}"


rule vlm_report:
    input:
        [str(paths.vlm_sft_dir(CFG))] + [str(paths.pope_dir(CFG, m)) for m in CFG.vlm.pope.models],
    output:
        md=str(paths.vlm_report_file(CFG)),
        rst=report(
            str(paths.vlm_report_rst(CFG)),
            caption="../workflow/report/vlm_tables.rst",
            category="Tables",
            labels={"report": "V-DPO"},
        ),
    params:
        cfg=view_json("vlm_report"),
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(VLM_LOGS / "vlm_report.log"),
    shell:
        "closedloop run-stage vlm_report --config-yaml {params.cfg:q} --log {log:q}"


rule vdpo_all:
    input:
        str(paths.vlm_report_file(CFG)),
