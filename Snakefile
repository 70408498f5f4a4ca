# closedloop: one DAG from data to report. Stages live in rules/<stage>.smk; every rule
# calls the `closedloop` CLI, which runs the stage's main(cfg).
#   snakemake --cores 2                                   # the embedded default experiment
#   snakemake --cores 2 --configfile configs/smoke.yaml   # the smoke config (tests)
#   snakemake --cores 2 vdpo_all                          # the V-DPO branch (SPEC §4)
#   snakemake --cores 2 --config 'seeds=[0,1,2]'          # the experiment per seed + a report over seeds
from snakemake.utils import min_version

min_version("9.0")


configfile: "configs/default.yaml"


include: "rules/common.smk"
include: "rules/data.smk"


if CFG.seeds:

    include: "rules/seeds.smk"  # rules/seed_run.smk once per seed (seed<k>_* rules), then seeds_report

else:

    include: "rules/sft.smk"
    include: "rules/evaluate.smk"
    include: "rules/mcts.smk"
    include: "rules/dpo.smk"
    include: "rules/report.smk"


include: "rules/vlm.smk"  # V-DPO branch: `snakemake vdpo_all`


rule all:
    default_target: True
    input:
        report_targets(),
