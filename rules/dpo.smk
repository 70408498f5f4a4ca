# Conservative DPO (SPEC §3): policy_{k-1} + pairs -> policy_k, per loop variant.
rule dpo:
    priority: LOOP_PRIORITY
    input:
        pairs=lambda w: str(paths.pairs_artifact(CFG, int(w.k), paths.variant_of_prefix(w.loop))),
        policy=lambda w: policy_artifact(w.loop, int(w.k) - 1),
        reference=lambda w: reference_artifact(w.loop, int(w.k)),
    output:
        directory(str(paths.dpo_dir(CFG, "{k}", "{loop}"))),
    params:
        cfg=lambda w: view_json("dpo", iteration=int(w.k)),
        variant=lambda w: paths.variant_of_prefix(w.loop),
    threads: 8  # capped at --cores by Snakemake
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "{loop}iter{k}" / "dpo.log"),
    benchmark:
        str(LOGS / "{loop}iter{k}" / "dpo.benchmark.tsv")
    shell:
        "OMP_NUM_THREADS={threads} closedloop run-stage dpo --config-yaml {params.cfg:q}"
        " job.iteration={wildcards.k:q} job.variant={params.variant:q} --log {log:q}"


# The instance-level online ablation's pairs: sampled full solutions, correct vs incorrect.
rule instance:
    priority: LOOP_PRIORITY
    input:
        data=str(paths.data_dir(CFG, CFG.mcts.task)),
        policy=lambda w: policy_artifact("ablations/instance_online/", int(w.k) - 1),
    output:
        directory(str(paths.instance_dir(CFG, "{k}"))),
    params:
        cfg=view_json("instance", [CFG.mcts.task]),
    threads: 8  # capped at --cores by Snakemake
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "ablations" / "instance_online" / "iter{k}" / "instance.log"),
    shell:
        "OMP_NUM_THREADS={threads} closedloop run-stage instance --config-yaml {params.cfg:q}"
        " job.iteration={wildcards.k:q} --log {log:q}"


for _ablation in cl_config.ABLATIONS:

    rule:
        name:
            f"ablation_{_ablation}"
        input:
            [str(paths.eval_dir(CFG, paths.model_tag(k, _ablation), t)) for k in paths.evaluated_iterations(CFG, _ablation) for t in CFG.eval.tasks],
