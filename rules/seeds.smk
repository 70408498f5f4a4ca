# Seeds as a DAG dimension (`seeds: [0, 1, 2]`): rules/seed_run.smk once per seed as a module
# (rules seed<k>_sft, seed<k>_evaluate, seed<k>_vlm_sft, ...; each job's config view carries its own
# seed), then the reports over seeds: the loop's, and the V-DPO branch's when `families` has vlm. The
# `module`/`use rule` keywords take literal names, so the loop calls the functions they compile to.
for _seed in CFG.seeds:
    workflow.module(name=f"seed{_seed}", snakefile="seed_run.smk", config={**config, "seed": _seed})
    workflow.userule(rules=["*"], from_module=f"seed{_seed}", name_modifier=f"seed{_seed}_*")(lambda: None)


SEED_CFGS = [paths.for_seed(CFG, s) for s in CFG.seeds]


rule seeds_report:
    input:
        [str(paths.report_file(c)) for c in SEED_CFGS],
        [str(paths.eval_dir(c, m, t)) for c in SEED_CFGS for m in paths.eval_model_tags(CFG) for t in CFG.eval.tasks],
    output:
        md=str(paths.seeds_report_file(CFG)),
        aggregate=str(paths.experiment_dir(CFG) / "seeds.json"),
    params:
        cfg=view_json("seeds_report"),
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(paths.experiment_dir(CFG) / "logs" / "seeds_report.log"),
    shell:
        "closedloop run-stage seeds_report --config-yaml {params.cfg:q} --log {log:q}"


# The V-DPO branch over seeds (SPEC §4): each seed's POPE scores and SFT record; the per-seed branch
# reports (seed<k>/vlm/report.md) come first.
rule vlm_seeds_report:
    input:
        [str(p) for c in SEED_CFGS for p in (paths.vlm_report_file(c), paths.vlm_sft_dir(c))],
        [str(paths.pope_dir(c, m)) for c in SEED_CFGS for m in CFG.vlm.pope.models],
    output:
        md=str(paths.vlm_seeds_report_file(CFG)),
        aggregate=str(paths.vlm_seeds_report_file(CFG).parent / "seeds.json"),
    params:
        cfg=view_json("vlm_seeds_report"),
    conda:
        "../workflow/envs/closedloop.yaml"
    log:
        str(paths.experiment_dir(CFG) / "logs" / "vlm_seeds_report.log"),
    shell:
        "closedloop run-stage vlm_seeds_report --config-yaml {params.cfg:q} --log {log:q}"


rule vdpo_all:
    input:
        str(paths.vlm_seeds_report_file(CFG)),
