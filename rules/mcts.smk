rule mcts:
    input:
        data=str(paths.data_dir(CFG, CFG.mcts.task)),
        policy=lambda w: policy_artifact(int(w.k) - 1),
    output:
        directory(str(paths.mcts_shard_dir(CFG, "{k}", "{shard}"))),
    params:
        cfg=view_json("mcts", [CFG.mcts.task]),
    threads: 8  # capped at --cores by Snakemake
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "iter{k}" / "mcts" / "shard{shard}.log"),
    benchmark:
        str(LOGS / "iter{k}" / "mcts" / "shard{shard}.benchmark.tsv")
    shell:
        "OMP_NUM_THREADS={threads} closedloop run-stage mcts --config-yaml {params.cfg:q}"
        " job.iteration={wildcards.k} job.shard={wildcards.shard} 2>&1 | tee {log}"


rule mcts_merge:
    input:
        lambda w: [str(paths.mcts_shard_dir(CFG, w.k, s)) for s in range(CFG.mcts.n_shards)],
    output:
        directory(str(paths.mcts_dir(CFG, "{k}") / "merged")),
    params:
        cfg=view_json("mcts", [CFG.mcts.task]),
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "iter{k}" / "mcts" / "merge.log"),
    shell:
        "closedloop run-stage mcts-merge --config-yaml {params.cfg:q} job.iteration={wildcards.k} 2>&1 | tee {log}"
