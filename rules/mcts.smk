# MCTS collection (SPEC §2) for iteration k of a loop: "{loop}" is "" for the closed loop
# and "ablations/<variant>/" for an ablation that searches with its own policy. One job
# searches every shard of the iteration: in turn here, or as one Slurm array (launch.py).
rule mcts:
    priority: LOOP_PRIORITY
    input:
        data=str(paths.data_dir(CFG, CFG.mcts.task)),
        policy=lambda w: policy_artifact(w.loop, int(w.k) - 1),
    output:
        [directory(str(paths.mcts_shard_dir(CFG, "{k}", s, "{loop}"))) for s in range(CFG.mcts.n_shards)],
    params:
        cfg=view_json("mcts", [CFG.mcts.task]),
        variant=lambda w: paths.variant_of_prefix(w.loop),
    threads: 8  # capped at --cores by Snakemake
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "{loop}iter{k}" / "mcts" / "shards.log"),
    benchmark:
        str(LOGS / "{loop}iter{k}" / "mcts" / "shards.benchmark.tsv")
    shell:
        "OMP_NUM_THREADS={threads} closedloop run-stage mcts --config-yaml {params.cfg:q}"
        " job.iteration={wildcards.k:q} job.variant={params.variant:q} --log {log:q}"


rule mcts_merge:
    priority: LOOP_PRIORITY
    input:
        lambda w: [str(paths.mcts_shard_dir(CFG, w.k, s, paths.variant_of_prefix(w.loop))) for s in range(CFG.mcts.n_shards)],
    output:
        directory(str(paths.mcts_dir(CFG, "{k}", "{loop}") / "merged")),
    params:
        cfg=view_json("mcts_merge", [CFG.mcts.task]),
        variant=lambda w: paths.variant_of_prefix(w.loop),
    # a few seconds of file work, but it holds every core so that no evaluation starts beside it
    # and then keeps the iteration's DPO (which needs all cores) waiting: measured ~100 s per iteration.
    # A large number, capped at --cores by Snakemake, rather than workflow.cores, which fails where
    # no --cores is given (snakemake --rulegraph, --dag).
    threads: 1024
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(LOGS / "{loop}iter{k}" / "mcts" / "merge.log"),
    shell:
        "closedloop run-stage mcts_merge --config-yaml {params.cfg:q} job.iteration={wildcards.k:q}"
        " job.variant={params.variant:q} --log {log:q}"
