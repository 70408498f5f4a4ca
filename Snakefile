# closedloop: one DAG from data to report. Stages live in rules/<stage>.smk; every rule
# calls the `closedloop` CLI, which runs the stage's main(cfg).
#   snakemake --cores 2                                   # the embedded default experiment
#   snakemake --cores 2 --configfile configs/smoke.yaml   # the smoke config (tests)
#   snakemake --cores 2 vdpo_all                          # the V-DPO branch (SPEC §4)
#   snakemake --cores 2 vlcot_all                         # VL-CoT with a vision head (SPEC §6)
#   snakemake --cores 2 coral_all                         # COrAL post-training + decoding (SPEC §5)
from snakemake.utils import min_version

min_version("9.0")


configfile: "configs/default.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/sft.smk"
include: "rules/evaluate.smk"
include: "rules/mcts.smk"
include: "rules/dpo.smk"
include: "rules/report.smk"
include: "rules/vlm.smk"  # V-DPO branch: `snakemake vdpo_all`
include: "rules/vlcot.smk"  # VL-CoT (SPEC §6): `snakemake vlcot_all`
include: "rules/coral.smk"  # COrAL: `snakemake coral_all`


rule all:
    default_target: True
    input:
        report_targets(),
