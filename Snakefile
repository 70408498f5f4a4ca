# closedloop: one DAG from data to report. Stages live in rules/<stage>.smk; every rule
# calls the `closedloop` CLI, which runs the stage's main(cfg).
#   snakemake --cores 2                                   # the embedded default experiment
#   snakemake --cores 2 --configfile configs/smoke.yaml   # the smoke config (tests)
#   snakemake --cores 2 vdpo_all                          # one family alone: vdpo_all, coral_all, vlcot_all
#   snakemake --cores 2 --config 'families=[loop]'        # `all` covers every family in `families`
#   snakemake --cores 2 --config 'seeds=[0,1,2]'          # the loop (and V-DPO) per seed + reports over seeds
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
    include: "rules/vlm.smk"  # V-DPO (SPEC §4): in `all` with `families: [.., vlm]`, or `snakemake vdpo_all`


include: "rules/vlcot.smk"  # VL-CoT (SPEC §6): `families: [.., vlcot]`, or `snakemake vlcot_all`
include: "rules/coral.smk"  # COrAL (SPEC §5): `families: [.., coral]`, or `snakemake coral_all`


# One default target over every family switched on in `families` (loop: the LLM closed loop's
# report; vlm: the V-DPO branch's report), the experiment's data/<experiment>.dvc and its DVC views.
rule all:
    default_target: True
    input:
        report_targets(),
