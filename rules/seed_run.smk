# One seed's run of the experiment (`seeds: [...]`): the same rules as a single run, as a
# Snakemake module whose config has `seed: <k>`; its outputs go to results/<experiment>/seed<k>/
# (paths.run_dir) and it reads the shared data/<experiment>/ made by the top-level `data` and
# `vlm_data` rules (rules/data.smk). The V-DPO branch's rules come along: they run when `families` has vlm.
include: "common.smk"
include: "sft.smk"
include: "evaluate.smk"
include: "mcts.smk"
include: "dpo.smk"
include: "report.smk"
include: "vlm.smk"
